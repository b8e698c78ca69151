"""Typed, strict run configuration.

One frozen dataclass per component; each component is handed only its own section
(``build_optimizer(model, cfg.optim)``), never the whole config. Precedence: field defaults, then
the TOML file (which may name one ``extends = "base.toml"``), then ``--set section.key=value``.
Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key and what
is allowed, before any process, Ray cluster or S3 write starts. The resolved config is stored with
every run as plain TOML (``config_to_dict`` / ``dump_toml``), never as a pickled object.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from pretrain.models.registry import VARIANTS


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names the key."""


class ResumeMismatch(ConfigError):
    """The run.url holds checkpoints this run cannot continue as configured (other shapes, other data...)."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "convnext"
    """Run name; shown in logs and used as the Ray Train run name."""
    url: str = "runs/demo"
    """Where checkpoints, TensorBoard logs and the resolved config go: a local path or s3://bucket/prefix."""
    seed: int = 0
    """Seeds model init, data order, augmentation and mixup."""
    allow_config_change: bool = False
    """Resume even if the run's stored config differs from this one (model shapes must still match)."""
    allow_data_change: bool = False
    """Resume on a different shard set: model, optimizer, EMA, LR position and step continue; the loader
    starts a fresh seeded epoch order on the new set at that step (recorded in the checkpoint manifest)."""

    def __post_init__(self) -> None:
        _check(bool(self.url.strip()), "run.url", "must be a local path or an s3:// URL, got an empty string")
        _check(bool(self.name.strip()), "run.name", "must not be empty")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "convnext_tiny"
    """ConvNeXt variant, one of pretrain.models.registry.VARIANTS."""
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the last block; increases linearly from 0 over all blocks."""
    layer_scale_init: float = 1e-6
    """Initial value of the per-channel layer scale gamma; 0 disables layer scale."""
    head_init_scale: float = 1.0
    """Multiplies the initial classifier weights and bias (0.001 when fine-tuning)."""
    checkpoint_stages: tuple[int, ...] = ()
    """Stage indices (0-3) whose blocks recompute activations in backward to save memory."""
    channels_last: bool = True
    """Feed inputs, and so all activations, in channels_last memory format (parameters stay contiguous)."""
    init_from: str = ""
    """Weights a new run starts from (fine-tuning): a run.url (its newest committed checkpoint), a
    `pretrain export` .safetensors, a timm .pth/.safetensors or an official {'model': ...} .pth; local
    path or s3://. Ignored once the run has its own checkpoints (it resumes from those)."""
    init_from_ema: bool = True
    """From a run.url: its EMA weights (true) or its model weights (false). From a file: its EMA entry
    ('state_dict_ema' / 'model_ema') when it has one, else its weights."""
    head_from: Literal["auto", "keep", "fresh", "match_classes"] = "auto"
    """The classifier (head.fc) of model.init_from. auto: keep it when its shape is this model's, else
    fresh (the official --finetune rule); keep: load it, its shape must match; fresh: a new head scaled
    by head_init_scale; match_classes: each training class takes the source row of the same class name
    (22k -> 1k: the ImageNet-1k synsets' rows of a 21,841-class head; n04399382 'teddy bear' is not
    among timm's 22k synsets and keeps a fresh row)."""
    compile: bool = False
    """torch.compile each block in place (regional: ZeRO's gradient hooks still fire per block, parameter
    names unchanged); works with activation checkpointing."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"

    def __post_init__(self) -> None:
        _check(self.name in VARIANTS, "model.name", f"unknown variant {self.name!r}; valid: {sorted(VARIANTS)}")
        _check(self.num_classes >= 1, "model.num_classes", f"must be >= 1, got {self.num_classes}")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        _check(self.layer_scale_init >= 0, "model.layer_scale_init", f"must be >= 0, got {self.layer_scale_init}")
        _check(self.head_init_scale > 0, "model.head_init_scale", f"must be > 0, got {self.head_init_scale}")
        bad = [s for s in self.checkpoint_stages if s not in (0, 1, 2, 3)]
        _check(not bad, "model.checkpoint_stages", f"stage indices must be in 0..3, got {bad}")
        _check(bool(self.init_from) or self.head_from == "auto", "model.head_from",
               f"{self.head_from!r} needs model.init_from (the weights whose head it picks); without it the head "
               "is always fresh: leave head_from = 'auto'")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_url: str = ""
    """Training shards: a directory or prefix (local, file:// or s3://) holding manifest.json."""
    eval_url: str = ""
    """Optional held-out shards for top-1/top-5 evaluation."""
    image_size: int = 224
    micro_batch_size: int = 32
    """Samples per worker per forward/backward pass."""
    num_workers: int = 8
    """DataLoader worker processes per training process (0 = load in the training process)."""
    prefetch_factor: int = 2
    shuffle_window: int = 1024
    """Samples read together and emitted in a seeded random order (memory: window x mean sample size)."""
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    randaugment: str = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string; empty disables it (color_jitter is then used)."""
    color_jitter: float = 0.4
    random_erasing: float = 0.25
    random_erasing_mode: Literal["pixel", "rand", "const"] = "pixel"
    mixup: float = 0.8
    """Mixup alpha; 0 disables."""
    cutmix: float = 1.0
    """CutMix alpha; 0 disables."""
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    crop_pct: float = 0.875
    """Eval: resize to image_size / crop_pct, then center-crop image_size."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_skip_fraction: float = 0.01
    """Stop the run when more than this fraction of read samples had to be skipped as corrupt."""

    def __post_init__(self) -> None:
        for key in ("image_size", "micro_batch_size", "prefetch_factor", "shuffle_window"):
            _check(getattr(self, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(self, key)}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(0 < self.scale[0] <= self.scale[1] <= 1, "data.scale", f"must satisfy 0 < min <= max <= 1, got {self.scale}")
        _check(0 < self.ratio[0] <= self.ratio[1], "data.ratio", f"must satisfy 0 < min <= max, got {self.ratio}")
        for key in ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob", "max_skip_fraction"):
            _check(0 <= getattr(self, key) <= 1, f"data.{key}", f"must be in [0, 1], got {getattr(self, key)}")
        _check(0 <= self.label_smoothing < 1, "data.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.mixup >= 0 and self.cutmix >= 0, "data.mixup/data.cutmix", "alphas must be >= 0")
        _check(not (self.mixup or self.cutmix) or self.micro_batch_size % 2 == 0, "data.micro_batch_size",
               f"must be even when mixup/cutmix is on (timm mixes each batch with its reverse), got "
               f"{self.micro_batch_size}")
        _check(0 < self.crop_pct <= 1, "data.crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        _check(all(s > 0 for s in self.std), "data.std", f"must be positive, got {self.std}")
        if self.randaugment:
            _check_augment_policy(self.randaugment)


# Sections timm's parsers understand; timm silently ignores a section without digits ('rand-zz' would
# train with the default RandAugment), so the grammar is checked here before timm parses the numbers.
_AUGMENT_SECTIONS = {"rand": {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int},
                     "augmix": {"m": int, "w": int, "d": int, "a": float, "b": float, "mstd": float}}
_RAND_TRANSFORM_SETS = ("weights", "3aw", "3a")
_AUGMENT_HELP = ("valid examples: 'rand-m9-mstd0.5-inc1', 'rand-m9-n2-tweights', 'augmix-m5-w3', 'original', "
                 "'v0r', or '' to disable")


@functools.lru_cache(maxsize=64)
def _check_augment_policy(policy: str) -> None:
    """Parse the policy strictly, then with timm: now, not inside the workers after the cluster started."""
    import re

    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    family, *sections = policy.split("-")
    for section in sections if family in _AUGMENT_SECTIONS else ():
        if family == "rand" and section.startswith("t") and not section[1:2].isdigit():
            _check(section[1:] in _RAND_TRANSFORM_SETS, "data.randaugment",
                   f"unknown transform set {section[1:]!r} in {policy!r}; valid: {list(_RAND_TRANSFORM_SETS)}")
            continue
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        kinds = _AUGMENT_SECTIONS[family]
        ok = match is not None and match.group(1) in kinds
        if ok:
            try:
                kinds[match.group(1)](match.group(2))
            except ValueError:
                ok = False
        _check(ok, "data.randaugment", f"section {section!r} of {policy!r} is not one of "
                                       f"{sorted(kinds)} followed by a number; {_AUGMENT_HELP}")
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if family == "rand":
            rand_augment_transform(policy, hparams)
        elif family == "augmix":
            augment_and_mix_transform(policy, hparams)
        else:  # timm's create_transform sends every other string to AutoAugment
            auto_augment_transform(policy, hparams)
    except Exception as exc:  # timm raises AssertionError, KeyError or ValueError for bad parts
        raise ConfigError(f"data.randaugment: timm cannot parse {policy!r} ({type(exc).__name__}: {exc}); "
                          f"{_AUGMENT_HELP}") from None


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 4e-3
    """Peak learning rate (at schedule.global_batch_size; no automatic scaling)."""
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    """Applied to >= 2-D weights only (not biases, norms or layer-scale gamma)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 disables."""
    implementation: Literal["auto", "torch", "torch_fused", "deepspeed_fused"] = "auto"
    """auto: torch.optim.AdamW, fused=True on CUDA (foreach on CPU); torch: foreach AdamW; torch_fused:
    fused AdamW; deepspeed_fused: DeepSpeed's FusedAdam (JIT-built: needs nvcc of torch's CUDA version)."""
    max_nonfinite_in_row: int = 10
    """Stop with an error after this many consecutive optimizer steps skipped for non-finite gradients."""
    layer_decay: float = 1.0
    """Layer-wise LR decay (fine-tuning; 1 = off): a parameter in layer i of the official ConvNeXt
    numbering (stem 0 ... stage 3 = 12, head 13 for S/B/L/XL) gets lr x layer_decay^(13 - i)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"each must be in [0, 1), got {self.betas}")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _check(self.max_nonfinite_in_row >= 1, "optim.max_nonfinite_in_row", "must be >= 1")
        _check(0 < self.layer_decay <= 1, "optim.layer_decay",
               f"must be in (0, 1] (1 = off; the paper's fine-tuning uses 0.8), got {self.layer_decay}")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    global_batch_size: int = 4096
    """Samples per optimizer step over all workers = micro_batch_size x accumulation x workers."""
    epochs: float = 90.0
    warmup_epochs: float = 5.0
    steps: int = 0
    """Total optimizer steps; overrides epochs when > 0 (short runs)."""
    warmup_steps: int = -1
    """Linear warmup steps; -1 derives them from warmup_epochs (scaled to `steps` when that is set)."""

    def __post_init__(self) -> None:
        _check(self.global_batch_size >= 1, "schedule.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        _check(self.epochs > 0, "schedule.epochs", f"must be > 0, got {self.epochs}")
        _check(0 <= self.warmup_epochs < self.epochs, "schedule.warmup_epochs",
               f"must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        _check(self.steps >= 0, "schedule.steps", f"must be >= 0 (0 = derive from epochs), got {self.steps}")
        _check(self.warmup_steps >= -1, "schedule.warmup_steps", "must be >= 0, or -1 to derive from warmup_epochs")
        if self.steps and self.warmup_steps >= 0:
            _check(self.warmup_steps < self.steps, "schedule.warmup_steps", f"must be < steps={self.steps}")


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """bf16 (default), fp16 with dynamic loss scaling, or fp32. Master weights and EMA stay fp32."""
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    fp16_hysteresis: int = 2
    fp16_min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        _check(0 <= self.fp16_initial_scale_power <= 32, "precision.fp16_initial_scale_power", "must be in 0..32")
        _check(self.fp16_loss_scale_window >= 1, "precision.fp16_loss_scale_window", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    stage: int = 2
    """ZeRO stage: 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters) partitioned over workers."""
    overlap_comm: bool = False
    """Reduce each full gradient bucket on a side stream while backward continues (needs buckets smaller
    than the model: see reduce_bucket_size)."""
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 0
    """Elements per gradient-reduction bucket; 0 = auto: parameters / 8, clamped to [1e7, 2e8] (XL: 4.9e7).
    A bucket larger than the model never fills during backward, so nothing would overlap."""
    allgather_bucket_size: int = 0
    """Elements per parameter all-gather bucket (0 = same as the reduce bucket; NCCL ignores it)."""
    communication_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype of the gradient reductions; auto = the model dtype (DeepSpeed's default: bf16 sums in bf16).
    The GPU recipes reduce in fp32."""
    grad_accum_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype gradients accumulate in across micro-batches; auto = the model dtype. fp32 with ZeRO-1 and
    bf16 uses DeepSpeed's BF16_Optimizer (a full fp32 gradient buffer per rank)."""
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        _check(self.stage in (1, 2, 3), "zero.stage", f"must be 1, 2 or 3, got {self.stage}")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            _check(getattr(self, key) >= 0, f"zero.{key}", "must be >= 0 (0 = auto)")
        _check(self.stage3_prefetch_bucket_size >= 1, "zero.stage3_prefetch_bucket_size", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = False
    """timm ModelEmaV3 warmup: decay = 1 - (1 + step / warmup_gamma) ** -warmup_power, capped at decay."""
    warmup_power: float = 2.0 / 3.0
    warmup_gamma: float = 1.0
    min_decay: float = 0.0
    update_after_step: int = 0
    """Optimizer steps before the EMA starts tracking (until then it copies the weights)."""

    def __post_init__(self) -> None:
        _check(0 < self.decay < 1, "ema.decay", f"must be in (0, 1), got {self.decay}")
        _check(0 <= self.min_decay <= self.decay, "ema.min_decay", f"must be in [0, decay], got {self.min_decay}")
        _check(self.warmup_power > 0 and self.warmup_gamma > 0, "ema.warmup_power/warmup_gamma", "must be > 0")
        _check(self.update_after_step >= 0, "ema.update_after_step", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N optimizer steps (also at the end and on SIGTERM)."""
    keep_last: int = 3
    """Committed checkpoints kept (the newest ones)."""
    keep_every_steps: int = 0
    """Additionally keep every checkpoint whose step is a multiple of this (0 = none)."""
    async_upload: bool = True
    """Upload in a background thread; training blocks only for the in-memory snapshot."""
    commit_timeout_s: float = 1800.0
    """How long rank 0 waits for every rank's files before the save is declared failed."""
    staging_dir: str = ""
    """Local scratch for serializing snapshots before upload (empty = a temporary directory)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "checkpoint.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")
        _check(self.keep_every_steps >= 0, "checkpoint.keep_every_steps", "must be >= 0 (0 = off)")
        _check(self.commit_timeout_s > 0, "checkpoint.commit_timeout_s", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    every_steps: int = 10
    """Console line and TensorBoard scalars every N optimizer steps."""
    tensorboard: bool = True
    image_grid: bool = True
    """Write a grid of augmented training images to TensorBoard at the start."""
    peak_tflops: float = 0.0
    """Accelerator bf16 dense peak for MFU; 0 = look up the device (CPU runs report no MFU)."""
    measure_peak: bool = False
    """On CUDA, time a large bf16 matmul at start and use it as the MFU peak (instead of the table)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "logging.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(self.peak_tflops >= 0, "logging.peak_tflops", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.eval_url every N steps (0 = only at the end)."""
    batch_size: int = 64
    max_samples: int = 0
    """Evaluate at most this many samples (0 = all)."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_samples >= 0, "eval.max_samples", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    num_workers: int = 2
    """Training processes (one DeepSpeed rank each; one per GPU on GPU clusters)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    address: str = ""
    """Ray cluster to join ('auto', 'ray://host:10001', host:port); empty starts a local Ray."""
    max_failures: int = 3
    """Worker-group restarts after a lost worker before the run fails (-1 = unlimited)."""
    max_repeated_startup_failures: int = 3
    """End the run (exit 2) when this many (re)starts in a row fail before their first step with the same
    error: a deterministic failure (CUDA OOM, NCCL init, S3 denied) is not retried forever."""
    collective_timeout_s: float = 1800.0
    """A collective that waits longer than this fails the step (a hung or dead rank)."""
    preemption_grace_s: float = 120.0
    """After SIGTERM, the checkpoint must be committed within this many seconds."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """PACK keeps a node's GPUs together in one placement group bundle set."""
    nccl_trace_dir: str = "/tmp/pretrain-nccl-trace"
    """Where a rank whose collective times out writes its NCCL flight-recorder trace (`torchfrtrace DIR`)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "launch.num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, "launch.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker > 0, "launch.gpus_per_worker", "must be > 0")
        _check(not self.use_gpu or self.gpus_per_worker == 1, "launch.gpus_per_worker",
               f"must be 1 with launch.use_gpu (one DeepSpeed rank per GPU), got {self.gpus_per_worker:g}; to use "
               "more GPUs, raise launch.num_workers")
        _check(self.max_failures >= -1, "launch.max_failures", "must be >= 0, or -1 for unlimited")
        _check(self.max_repeated_startup_failures >= 1, "launch.max_repeated_startup_failures", "must be >= 1")
        _check(self.collective_timeout_s > 0, "launch.collective_timeout_s", "must be > 0")
        _check(self.preemption_grace_s > 0, "launch.preemption_grace_s", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    endpoint_url: str = ""
    """S3 endpoint (MinIO, moto, ...); empty uses AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS config."""
    region: str = ""
    profile: str = ""
    """AWS shared-config profile; credentials are never stored in this config."""
    anon: bool = False
    retries: int = 8
    """Retries of one storage call on transient errors (5xx, throttling, resets, timeouts); permanent
    errors (403, 404, 416, ...) are never retried. Backoff: capped exponential with full jitter."""
    retry_base_s: float = 0.2
    retry_max_s: float = 20.0
    connect_timeout_s: float = 20.0
    read_timeout_s: float = 120.0
    multipart_chunk_mb: int = 50
    """Uploads larger than twice this go to S3 as multipart uploads of parts this size (S3 minimum: 5)."""

    def __post_init__(self) -> None:
        _check(self.endpoint_url == "" or self.endpoint_url.startswith(("http://", "https://")),
               "storage.endpoint_url", f"must start with http:// or https://, got {self.endpoint_url!r}")
        _check(self.retries >= 0, "storage.retries", f"must be >= 0, got {self.retries}")
        _check(0 < self.retry_base_s <= self.retry_max_s, "storage.retry_base_s/retry_max_s",
               f"must satisfy 0 < retry_base_s <= retry_max_s, got {self.retry_base_s}, {self.retry_max_s}")
        _check(self.connect_timeout_s > 0 and self.read_timeout_s > 0, "storage.connect_timeout_s/read_timeout_s",
               "must be > 0")
        _check(5 <= self.multipart_chunk_mb <= 5120, "storage.multipart_chunk_mb",
               f"must be in 5..5120 (S3's part size limits), got {self.multipart_chunk_mb}")


@dataclass(frozen=True, kw_only=True)
class LeaseConfig:
    enabled: bool = True
    """One job per run.url: a lease object (<run.url>/lease.json) written with conditional writes."""
    heartbeat_s: float = 30.0
    """How often the driver and rank 0 renew the lease."""
    timeout_s: float = 600.0
    """A lease whose last heartbeat is older than this may be taken over (with takeover)."""
    takeover: bool = False
    """Take a lease whose heartbeat is older than timeout_s (`pretrain train --takeover`)."""

    def __post_init__(self) -> None:
        _check(self.heartbeat_s > 0, "lease.heartbeat_s", f"must be > 0, got {self.heartbeat_s}")
        _check(self.timeout_s >= 3 * self.heartbeat_s, "lease.timeout_s",
               f"must be >= 3 x lease.heartbeat_s = {3 * self.heartbeat_s:g}, got {self.timeout_s:g}")


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    name: Literal["classification", "segmentation"] = "classification"
    """What the run trains (pretrain/tasks/): each task supplies its head, loss, sample decoding,
    augmentation, metrics and export layout; the rest of the system is shared."""


@dataclass(frozen=True, kw_only=True)
class SegmentationConfig:
    """`task.name = "segmentation"`: ConvNeXt + UperNet (docs/tasks.md). `data.image_size` is the training
    crop; the defaults are the official ADE20K 512 setup."""

    scale: tuple[int, int] = (2048, 512)
    """mmseg's img_scale (long, short side): what `ratio_range` rescales in training, the eval size."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    """A training crop may be at most this fraction one class (up to 10 tries), as mmseg's RandomCrop."""
    photometric: bool = True
    """mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue)."""
    ce_weight: float = 1.0
    dice_weight: float = 0.0
    iou_weight: float = 0.0
    lovasz_weight: float = 0.0
    class_weights: tuple[float, ...] = ()
    """Per-class cross-entropy weights (empty: all 1)."""
    aux_weight: float = 0.4
    """Cross-entropy weight of the auxiliary FCN head on stage 3 (0 removes the head)."""
    channels: int = 512
    aux_channels: int = 256

    def __post_init__(self) -> None:
        weights = (self.ce_weight, self.dice_weight, self.iou_weight, self.lovasz_weight)
        _check(all(w >= 0 for w in weights) and any(w > 0 for w in weights), "segmentation.*_weight",
               f"loss weights must be >= 0 with one > 0 (ce, dice, iou, lovasz), got {list(weights)}")
        _check(self.aux_weight >= 0, "segmentation.aux_weight", f"must be >= 0, got {self.aux_weight}")
        _check(0 < self.ratio_range[0] <= self.ratio_range[1], "segmentation.ratio_range",
               f"must be 0 < low <= high, got {list(self.ratio_range)}")
        _check(all(s >= 32 for s in self.scale), "segmentation.scale", f"sides must be >= 32, got {list(self.scale)}")
        _check(0 < self.cat_max_ratio <= 1, "segmentation.cat_max_ratio", f"must be in (0, 1], got {self.cat_max_ratio}")
        _check(all(w >= 0 for w in self.class_weights), "segmentation.class_weights", "must be >= 0")
        _check(self.channels >= 1 and self.aux_channels >= 1, "segmentation.channels", "widths must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)

    def __post_init__(self) -> None:
        grad_accum_steps(self.schedule, self.data, self.launch.num_workers)
        if self.task.name == "segmentation":
            d = self.data
            unused = [k for k, v in (("data.mixup", d.mixup), ("data.cutmix", d.cutmix),
                                     ("data.random_erasing", d.random_erasing), ("data.randaugment", d.randaugment)) if v]
            _check(not unused, "task.name", f"segmentation does not use the classification augmentations {unused}; "
                   "set them to 0 / \"\" (its own are under [segmentation])")
        classes = len(self.segmentation.class_weights)
        _check(not classes or classes == self.model.num_classes, "segmentation.class_weights",
               f"has {classes} entries; model.num_classes is {self.model.num_classes}")


def grad_accum_steps(schedule: ScheduleConfig, data: DataConfig, num_workers: int) -> int:
    """Accumulation derived from global = micro x accumulation x workers; raises when not integral."""
    per_step = data.micro_batch_size * num_workers
    total = schedule.global_batch_size
    if total % per_step:
        valid = [m for m in range(1, total + 1) if total % (m * num_workers) == 0][:12]
        hint = (f"micro-batch sizes that work with {num_workers} workers: {valid}" if valid else
                f"no micro-batch size works with {num_workers} workers; worker counts that divide "
                f"{total}: {[n for n in range(1, min(total, 4096) + 1) if total % n == 0][:16]}")
        raise ConfigError(
            f"schedule.global_batch_size: {total} is not divisible by data.micro_batch_size x "
            f"launch.num_workers = {data.micro_batch_size} x {num_workers} = {per_step}; {hint}")
    return schedule.global_batch_size // per_step


# Keys that may change between a checkpoint and the run resuming it (elastic resume, new cluster, logging).
RESUMABLE_CHANGES = ("run.allow_config_change", "run.allow_data_change", "run.name", "run.url", "data.num_workers",
                     "data.prefetch_factor", "data.micro_batch_size", "data.train_url", "data.eval_url",
                     "data.max_skip_fraction", "zero.", "checkpoint.", "logging.", "eval.", "launch.", "storage.",
                     "lease.", "optim.implementation", "model.compile", "model.compile_mode")


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- TOML file (with optional `extends`) <- `section.key=value` overrides."""
    data: dict[str, Any] = _read_toml(Path(path)) if path else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=1e-3")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"--set {item!r}: {section!r} is not a section")
        data[section][name] = _parse_override(raw.strip())
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for TOML/JSON and checkpoint metadata."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def dump_toml(cfg: Config) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Human-readable differences between two resolved configs, skipping keys allowed to change.

    A key that `old` lacks (a checkpoint written before the key existed) counts as its default value."""
    diffs = []
    defaults = config_to_dict(Config())
    for section in sorted(set(old) | set(new)):
        a = {**defaults.get(section, {}), **old.get(section, {})}
        b = new.get(section, {})
        for key in sorted(set(a) | set(b)):
            dotted = f"{section}.{key}"
            if any(dotted == p or (p.endswith(".") and dotted.startswith(p)) for p in ignore):
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{dotted}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def section_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal after each field), for `pretrain config --explain`."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value  # type: ignore[union-attr]
    return docs


def _read_toml(path: Path, depth: int = 0) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or depth > 4:
        raise ConfigError(f"{path}: 'extends' must name one TOML file (chains deeper than 4 are refused)")
    merged = _read_toml(path.parent / base, depth + 1)
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _parse_override(raw: str) -> Any:
    """A TOML literal when the value parses as one (1e-3, true, [1, 2], "x"), else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, dotted)
        else:
            kwargs[name] = _coerce(value, hint, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-key check above
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {args}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover
