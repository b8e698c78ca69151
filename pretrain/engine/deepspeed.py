"""The only module that talks to DeepSpeed: config generation, engine creation, ZeRO partitions.

Checkpoints and the EMA work on **fragments**: the slice ``[start, start + numel)`` of a flattened
parameter whose fp32 master copy (and Adam moments) this rank owns under ZeRO 1, 2 or 3. Fragments
are addressed by parameter name and flat offset, not by rank, so a checkpoint written by N ranks
at one stage can be loaded by M ranks at another stage (elastic resume) without DeepSpeed's offline
universal-checkpoint conversion, and an EMA kept per fragment is sharded exactly like the master
weights (DeepSpeed has no EMA of its own, issue #2056).

DeepSpeed exposes per-fragment access only partly (``safe_get_local_fp32_param`` is ZeRO-3 only and
optimizer-state fragments are linked lazily), so the mapping below reads the optimizer's partition
bookkeeping directly; it is pinned to deepspeed 0.19.x and covered by the engine tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from pretrain.config import PrecisionConfig, ZeroConfig

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def bucket_elements(zero: ZeroConfig, num_params: int) -> tuple[int, int]:
    """(reduce, allgather) bucket sizes in elements; 0 in the config means auto.

    Rule: a reduce bucket of about 1/8 of the parameters, clamped to [1e7, 2e8] elements. With ``overlap_comm``
    DeepSpeed reduces a bucket on a side stream as soon as it fills during backward, so it must be well
    below the model size (the old default, 5e8, exceeds even ConvNeXt-XL's 392.9M: nothing overlapped), but
    large enough that 128-rank all-reduce latency and per-bucket hook overhead stay small (XL: 4.9e7).
    """
    reduce = zero.reduce_bucket_size or int(min(max(num_params // 8, 10_000_000), 200_000_000))
    allgather = zero.allgather_bucket_size or reduce
    return reduce, allgather + allgather % 2  # DeepSpeed wants an even all-gather bucket


def deepspeed_config(precision: PrecisionConfig, zero: ZeroConfig, grad_clip: float, micro_batch: int,
                     accum_steps: int, world_size: int, num_params: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from our config (never kept by hand)."""
    reduce_bucket, allgather_bucket = bucket_elements(zero, num_params)
    zero_section: dict[str, Any] = {
        "stage": zero.stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": reduce_bucket,
        "allgather_bucket_size": allgather_bucket,
    }
    if zero.stage == 3:
        zero_section.update(stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
                            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world_size,
        "zero_optimization": zero_section,
        # check_grad_overflow (the default) is what skips a step whose gradients are not finite
        "bf16": {"enabled": precision.dtype == "bf16"},
        "fp16": {"enabled": False},
        "gradient_clipping": grad_clip,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    if zero.communication_dtype != "auto":
        config["communication_data_type"] = zero.communication_dtype
    if zero.grad_accum_dtype != "auto":
        config["data_types"] = {"grad_accum_dtype": zero.grad_accum_dtype}
    if precision.dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0,
                          "initial_scale_power": precision.fp16_initial_scale_power,
                          "loss_scale_window": precision.fp16_loss_scale_window,
                          "hysteresis": precision.fp16_hysteresis,
                          "min_loss_scale": precision.fp16_min_loss_scale}
    return config


def _skip_inference_only_ops() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce kernel.

    On first init DeepSpeed probes every op's compiler compatibility and JIT-compiles that kernel,
    which only serves ``inference_all_reduce`` (training collectives go through torch.distributed).
    The probe costs seconds per process and the build up to a minute, repeated whenever the build
    environment's hash changes (torchrun vs Ray workers). Its answer is cached in this module dict.
    """
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {"deepspeed_shm_comm": False})


def _data_parallel_group_with_timeout(timeout_s: float) -> None:
    """Give DeepSpeed's data-parallel group the run's collective timeout.

    Without an mpu DeepSpeed reduces gradients over a clone of the world group that it creates with
    ``new_group(ranks)``, and torch gives such a group the backend's default timeout (30 min), not the
    world group's: a hung rank would stall every other rank inside backward for 30 minutes whatever
    ``launch.collective_timeout_s`` says. The clone is cached in ``deepspeed.utils.groups._WORLD_GROUP``
    (pinned to 0.19.x); creating it here, per process group, with the timeout is all that is needed.
    """
    import datetime

    import torch.distributed as dist
    from deepspeed.utils import groups

    world = dist.group.WORLD
    if getattr(groups, "_pretrain_world", None) is not world:  # a new default group (or the first engine)
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=datetime.timedelta(seconds=timeout_s))
        groups._pretrain_world = world


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
               collective_timeout_s: float):
    """A DeepSpeed engine around `model`; torch.distributed must already be initialized."""
    import deepspeed

    _skip_inference_only_ops()
    _data_parallel_group_with_timeout(collective_timeout_s)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


def fused_adam_class():
    """DeepSpeed's FusedAdam (JIT-compiled at first use: needs an nvcc of torch's CUDA major version)."""
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam


def lp_dtype(precision: PrecisionConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision.dtype]


@dataclass
class Fragment:
    """This rank's slice of one parameter's fp32 master weights and Adam moments (views)."""

    name: str
    shape: tuple[int, ...]
    start: int
    numel: int
    master: torch.Tensor
    states: dict[str, torch.Tensor]
    state_owner: torch.Tensor
    """The flat fp32 partition the optimizer keys this fragment's state under."""

    @property
    def key(self) -> str:
        return f"{self.name}#{self.start}"


def _is_stage3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def _fp32_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter group.

    ZeRO-1/2 keep them in ``single_partition_of_fp32_groups``; ZeRO-1 with bf16 and fp32 gradient
    accumulation runs DeepSpeed's ``BF16_Optimizer``, which names them ``fp32_groups_flat_partition``;
    ZeRO-3 ``fp32_partitioned_groups_flat``. Parameter-to-fragment links (``_hp_mapping``) are the same
    for the first two.
    """
    zero_opt = engine.optimizer
    for name in ("fp32_partitioned_groups_flat" if _is_stage3(engine) else "single_partition_of_fp32_groups",
                 "fp32_groups_flat_partition"):
        if hasattr(zero_opt, name):
            return list(getattr(zero_opt, name))
    raise TypeError(f"unsupported DeepSpeed optimizer {type(zero_opt).__name__}: no fp32 partitions found")


def ensure_optimizer_state(engine, step: int = 0) -> None:
    """Create Adam's state tensors if the optimizer has not stepped yet (torch initializes lazily).

    The step counter lives where torch would put it: on the partition's device for fused (and
    capturable) AdamW, whose CUDA kernel reads it there, else a CPU scalar.
    """
    inner = engine.optimizer.optimizer
    for group, flat in zip(inner.param_groups, _fp32_partitions(engine)):
        state = inner.state[flat]
        if not state:
            on_device = bool(group.get("fused") or group.get("capturable"))
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=flat.device if on_device else "cpu")
            for key in ADAM_STATES:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def local_fragments(engine) -> list[Fragment]:
    """Fragments owned by this rank, in a stable order (module parameter order)."""
    ensure_optimizer_state(engine)
    zero_opt = engine.optimizer
    inner = zero_opt.optimizer
    out: list[Fragment] = []
    if _is_stage3(engine):
        rank = torch.distributed.get_rank(group=zero_opt.dp_process_group)
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:
                continue
            group, offset, _ = zero_opt.grad_position[zero_opt.get_param_id(param)]
            flat = zero_opt.fp32_partitioned_groups_flat[group]
            part = param.ds_tensor.ds_numel
            start = rank * part
            numel = min(part, param.ds_numel - start)
            if numel <= 0:
                continue
            states = {k: inner.state[flat][k].narrow(0, offset, numel) for k in ADAM_STATES}
            out.append(Fragment(name, tuple(param.ds_shape), start, numel, flat.narrow(0, offset, numel),
                                states, flat))
        return out
    flats = _fp32_partitions(engine)
    for name, param in engine.module.named_parameters():
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        flat = flats[mapping.param_group_index]
        hp = mapping.hp_fragment_address
        states = {k: inner.state[flat][k].narrow(0, hp.start, hp.numel) for k in ADAM_STATES}
        out.append(Fragment(name, tuple(param.shape), mapping.lp_fragment_address.start,
                            mapping.lp_fragment_address.numel, mapping.hp_fragment, states, flat))
    return out


def describe(engine) -> str:
    """The optimizer DeepSpeed built, e.g. 'DeepSpeedZeroOptimizer over AdamW (fused)'."""
    inner = engine.optimizer.optimizer
    fused = " (fused)" if any(g.get("fused") for g in inner.param_groups) else ""
    return f"{type(engine.optimizer).__name__} over {type(inner).__name__}{fused}"


def optimizer_step_count(engine) -> int:
    inner = engine.optimizer.optimizer
    steps = [float(s["step"]) for s in inner.state.values() if "step" in s]
    return int(max(steps)) if steps else 0


def set_optimizer_step_count(engine, step: int) -> None:
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step), dtype=state["step"].dtype, device=state["step"].device)


@torch.no_grad()
def refresh_lp_params(engine) -> None:
    """Copy the fp32 masters into the low-precision model parameters (after writing masters)."""
    zero_opt = engine.optimizer
    if _is_stage3(engine):
        for fp32, lp in zip(zero_opt.fp32_partitioned_groups_flat, zero_opt.fp16_partitioned_groups_flat):
            lp.data.copy_(fp32.data)
        return
    zero_opt.update_lp_params()


def loss_scaler_state(engine) -> dict[str, float]:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not hasattr(scaler, "cur_scale"):
        return {}
    return {k: float(getattr(scaler, k)) for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
            if hasattr(scaler, k)}


def load_loss_scaler_state(engine, state: dict[str, float]) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not state:
        return
    for key, value in state.items():
        if hasattr(scaler, key):
            setattr(scaler, key, type(getattr(scaler, key))(value))


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> float | None:
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value)


def overflowed(engine) -> bool:
    """fp16: whether the last step was skipped by the dynamic loss scaler."""
    return bool(getattr(engine.optimizer, "overflow", False))


def quiet_deepspeed_logging() -> None:
    os.environ.setdefault("DEEPSPEED_LOG_LEVEL", "warning")
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
