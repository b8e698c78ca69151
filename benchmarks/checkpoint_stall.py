"""Checkpoint: what an asynchronous checkpoint stalls training for ÷ a blocking save + upload.

World size 1, the worker's real checkpoint path: a ``pretrain.trainer.Trainer`` built by its own
constructor (DeepSpeed ZeRO-2, bf16, AdamW, sharded EMA), its ``CheckpointManager`` on
``s3://bench-ckpt-<id>/run`` in the moto S3 server (over HTTP on loopback). The data loader is a real ``TrainLoader`` over a made-up 1.28M-image manifest (never
read: only its resume state goes into the checkpoint). A rank's state is its fp32 master weights,
both Adam moments and the EMA, 16 bytes per parameter: ``convnext_nano`` (15.6M parameters, 250 MB,
what an XL 22k rank holds at 25 workers) in the full run, ``convnext_atto`` (3.7M, 59 MB, close to
the 49 MB an XL rank holds at the recipe's 128 workers) in the quick one.

* A, asynchronous (what ``Trainer.fit`` does every ``checkpoint.every_steps``): the seconds
  ``Trainer.save()`` blocks the training loop, i.e. ``_snapshot()`` (copy every state tensor to host
  memory, RNG, loader state, run metadata) plus ``CheckpointManager.save()`` handing the snapshot to
  the upload thread. The previous upload has always finished by then (the benchmark waits for it,
  untimed, after each A), so the figure contains no wait for it; in the recipe saves are 1000 steps
  apart, and the upload time (in the context) must stay below that interval for this to hold.
  Not in the figure: the upload thread's CPU use while training goes on (on GPU nodes it shares the
  worker's 10 cores with the data loader, not the GPU).
* B, blocking (what a save on preemption or at the end costs): ``Trainer.save(blocking=True)`` of the
  same state, i.e. the snapshot plus serialization (safetensors), sha256, upload, the rank marker,
  the manifest commit and retention.

Every save is a new step directory; retention keeps the last 2. The S3 rate is bytes ÷ seconds of
each ``storage.upload_file`` call of a rank file (the call the upload thread makes), measured in both
A's and B's uploads; moto is a single Python process on loopback, so this is the endpoint's rate, a
floor for real S3, not a property of this code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator

from benchmarks.harness import CONTEXT, MEASURED, Context, Goal, Row, alternate, fmt_s

NAME = "checkpoint_stall"
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.toml")
CLASSES = 1000
IMAGES = 1_281_167


def _model(ctx: Context) -> str:
    return "convnext_atto" if ctx.quick else "convnext_nano"


def plan(ctx: Context) -> list[Row]:
    model = _model(ctx)
    return [
        Row("ckpt/async-stall-vs-blocking", NAME,
            f"training stall of an async checkpoint ÷ blocking save + upload ({model}, {CLASSES} classes: fp32 "
            "master + Adam moments + EMA; world size 1; moto S3)", Goal("<=", 0.10),
            sides="Trainer.save() ÷ Trainer.save(blocking=True)"),
        Row("ckpt/upload-mb-s", NAME, "upload rate of a rank file to the S3 endpoint (storage.upload_file)", CONTEXT,
            kind="value", unit="MB/s"),
    ]


@contextlib.contextmanager
def _timed_uploads(log: list[tuple[int, float]]) -> Iterator[None]:
    """Record (bytes, seconds) of every ``storage.upload_file`` call (the checkpoint thread's upload)."""
    from pretrain import storage

    original = storage.upload_file

    def upload_file(local_path: str, url: str, storage_cfg=None) -> None:
        size = os.path.getsize(local_path)
        start = time.perf_counter()
        original(local_path, url, storage_cfg)
        log.append((size, time.perf_counter() - start))

    storage.upload_file = upload_file
    try:
        yield
    finally:
        storage.upload_file = original


def _trainer(ctx: Context, model: str):
    """The worker's Trainer: real engine, real CheckpointManager on S3, a real (never iterated) loader."""
    from benchmarks.engine_overhead import build_trainer, stand_in_manifest
    from pretrain import storage
    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import load_config
    from pretrain.engine.distributed import init_distributed

    ctx.s3()
    url = f"s3://bench-ckpt-{uuid.uuid4().hex[:8]}/run"
    storage.ensure_bucket(url)
    cfg = load_config(DEMO, [f"run.url={os.path.join(ctx.workdir, 'ckpt-metrics')}", "data.train_url=unused",
                             f"model.name={model}", f"model.num_classes={CLASSES}", "data.mixup=0.0",
                             "data.cutmix=0.0", "logging.image_grid=false", "launch.num_workers=1",
                             "data.micro_batch_size=32", "schedule.global_batch_size=32", "lease.enabled=false",
                             "checkpoint.keep_last=2", "schedule.steps=100000", "schedule.warmup_steps=10"])
    # metrics stay local (no TensorBoard sync to S3); checkpoints go to S3
    trainer = build_trainer(cfg, init_distributed(300.0), stand_in_manifest(CLASSES, IMAGES))
    trainer.cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, url=url))
    trainer.checkpoints = CheckpointManager(url, cfg.checkpoint, cfg.storage, 0, 1)
    return trainer, url


def run(ctx: Context, rows: dict[str, Row]) -> None:
    model = _model(ctx)
    uploads: list[tuple[int, float]] = []
    async_upload_s: list[float] = []
    trainer = None
    try:
        trainer, url = _trainer(ctx, model)
        ckpt = trainer.checkpoints
        state_bytes = sum(f.numel for f in trainer.fragments) * 4 * (3 + (trainer.ema is not None))

        def async_save() -> float:
            trainer.state.step += 1  # every save is a new step directory, as in training
            stall = trainer.save()
            ckpt.wait()  # untimed: the next save finds the upload done (see the module docstring)
            async_upload_s.append(ckpt.last_upload_s)
            return stall

        def blocking_save() -> float:
            trainer.state.step += 1
            return trainer.save(blocking=True)

        timer: Callable[[Callable[[], float]], float] = lambda fn: fn()  # each side times itself
        with _timed_uploads(uploads):
            stats = alternate(async_save, blocking_save, reps=ctx.pairs(5, 7), warmup=1, timer=timer, log=ctx.log)
        committed = ckpt.committed_steps()
    finally:
        if trainer is not None:
            trainer.checkpoints.close()
            trainer.metrics.close()
    if committed != [trainer.state.step - 1, trainer.state.step]:
        raise RuntimeError(f"expected the last 2 steps committed at {url}, found {committed}")
    row = rows["ckpt/async-stall-vs-blocking"]
    row.set_pairs(stats)
    rank_files = [(b, s) for b, s in uploads if b > 1 << 20]  # the safetensors files, not markers
    file_mb = statistics.median(b for b, _ in rank_files) / 1e6
    upload_s = statistics.median(s for _, s in rank_files)
    row.context = (f"stall {fmt_s(stats.a_median)} vs blocking {fmt_s(stats.b_median)} for {file_mb:.0f} MB per rank "
                   f"(of which upload {fmt_s(upload_s)}); async upload done {fmt_s(statistics.median(async_upload_s))} "
                   "after save() returned")
    row.detail = {"pairs": stats.to_json(), "model": model, "state_bytes": state_bytes, "rank_file_bytes": file_mb * 1e6,
                  "async_upload_s": async_upload_s, "uploads": uploads, "url": url, "world_size": 1,
                  "ema": trainer.ema is not None, "zero_stage": trainer.cfg.zero.stage}
    rate = rows["ckpt/upload-mb-s"]
    rates = [b / s / 1e6 for b, s in rank_files]
    rate.value, rate.status, rate.reps = statistics.median(rates), MEASURED, len(rates)
    where = ctx.s3_endpoint() if ctx.s3() == "external" else "moto server on loopback"
    rate.context = (f"median of {len(rates)} uploads of {file_mb:.0f} MB (min {min(rates):.0f}, max {max(rates):.0f}) "
                    f"to {where}: the endpoint's rate, not ours")
    ctx.log(f"    stall {fmt_s(stats.a_median)}, blocking {fmt_s(stats.b_median)}, ratio {stats.ratio:.3f}; "
            f"upload {rate.value:.0f} MB/s")
