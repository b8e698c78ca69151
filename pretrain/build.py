"""Builders that anything can call (the worker's Trainer, the benchmarks, tools): the training data,
the model and the DeepSpeed engine, each returned as a small typed result.

The order of the calls matters for exact reproducibility: `build_model` seeds torch so that every rank
creates identical initial weights; the caller seeds the per-rank training RNG after `build_engine`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pretrain.config import Config, ModelConfig, StorageConfig, grad_accum_steps
from pretrain.data.loader import TrainLoader
from pretrain.data.shards import Manifest
from pretrain.ema import ShardedEma
from pretrain.engine import cpu_bf16
from pretrain.engine import deepspeed as ds
from pretrain.engine.compilation import compile_blocks
from pretrain.engine.distributed import DistContext, on_rank0
from pretrain.models.flops import flops_per_image
from pretrain.init_from import Source
from pretrain.optim import StepPlan, build_optimizer, step_plan
from pretrain.preflight import check_run
from pretrain.run_meta import DataIdentity
from pretrain.tasks import Task, build_task


@dataclass
class DataSetup:
    """The training set as every rank sees it, the task over its classes, and how the run steps through it."""

    manifest: Manifest
    eval_manifest: Manifest | None
    identity: DataIdentity
    """What a checkpoint records of the data (URL, size, manifest hash) to decide a resume."""
    steps: StepPlan
    accum: int
    """Micro-batches per optimizer step on each rank."""
    task: Task
    loader: TrainLoader


@dataclass
class EngineSetup:
    """A DeepSpeed engine around the task's model, this rank's ZeRO fragments and their EMA."""

    engine: object
    fragments: list[ds.Fragment]
    ema: ShardedEma | None
    dtype: torch.dtype
    """The model's compute dtype (bf16, fp16 or fp32)."""
    model_shapes: dict[str, tuple[int, ...]]
    flops_per_image: float


def build_data(cfg: Config, ctx: DistContext, manifest: Manifest | None = None,
               eval_manifest: Manifest | None = None) -> DataSetup:
    """Read the shard manifests (rank 0 reads, every rank receives: one read per run, not per rank) and
    set up this rank's loader. A given `manifest` is used as it is (benchmarks: no storage access)."""
    if manifest is None:
        datasets = on_rank0(lambda: check_run(cfg, on_cuda=ctx.device.type == "cuda"))
        manifest, eval_manifest = datasets.train, datasets.eval
    digest = hashlib.sha256(manifest.to_json().encode()).hexdigest()  # once: ~60 ms for a 22k set
    task = build_task(cfg, manifest, ctx.device)
    loader = TrainLoader(cfg.data.train_url, manifest, cfg.data, cfg.storage, ctx.rank, ctx.world_size,
                         cfg.run.seed, task.decoder(train=True), pin_memory=ctx.device.type == "cuda")
    return DataSetup(manifest, eval_manifest, DataIdentity(cfg.data.train_url, manifest.num_samples, digest),
                     step_plan(cfg.schedule, manifest.num_samples),
                     grad_accum_steps(cfg.schedule, cfg.data, ctx.world_size), task, loader)


def build_model(task: Task, cfg: ModelConfig, seed: int, init: Source | None = None, classes: Sequence[str] = (),
                storage_cfg: StorageConfig | None = None) -> torch.nn.Module:
    """The task's model with identical initial weights on every rank (seeded), then the weights of `init`
    (``model.init_from`` as :func:`pretrain.init_from.resolve` found it), its head set up for `classes`."""
    torch.manual_seed(seed)
    model = task.build_model()
    if init is not None:
        task.load_pretrained(model, init, cfg, list(classes), storage_cfg)
    return model


def build_engine(cfg: Config, ctx: DistContext, model: torch.nn.Module, accum: int) -> EngineSetup:
    """Move `model` to the device, compile it if asked, and wrap it with its optimizer in DeepSpeed."""
    # Parameters stay contiguous: ZeRO flattens them into shared buffers. Inputs (and so every
    # activation) are channels_last when model.channels_last is set.
    model = model.to(ctx.device)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    flops = flops_per_image(model, cfg.data.image_size)
    if cpu_bf16.needed(cfg.precision.dtype, ctx.device):
        cpu_bf16.apply(model)
    if cfg.model.compile:
        compile_blocks(model, cfg.model.compile_mode)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape
    optimizer = build_optimizer(model, cfg.optim, on_cuda=ctx.device.type == "cuda")
    ds.quiet_deepspeed_logging()
    ds_config = ds.deepspeed_config(cfg.precision, cfg.zero, cfg.optim.grad_clip, cfg.data.micro_batch_size,
                                    accum, ctx.world_size, sum(p.numel() for p in model.parameters()))
    engine = ds.initialize(model, optimizer, ds_config, cfg.launch.collective_timeout_s)
    fragments = ds.local_fragments(engine)
    ema = ShardedEma(cfg.ema, fragments) if cfg.ema.enabled else None
    return EngineSetup(engine, fragments, ema, ds.lp_dtype(cfg.precision), shapes, flops)
