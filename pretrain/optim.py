"""AdamW parameter groups and the per-step learning-rate schedule (linear warmup, cosine to min_lr).

Matches the official ConvNeXt code: no weight decay on 1-D parameters (LayerNorm weights, biases,
layer-scale gamma); the schedule is a pure function of the optimizer step, so resuming needs no
scheduler state and the LR position is restored with the step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pretrain.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def step_plan(schedule: ScheduleConfig, num_samples: int) -> StepPlan:
    """Steps from epochs x steps-per-epoch (22k XL at 4096: 3,466/epoch, 311,940 total, 17,330 warmup)."""
    per_epoch = max(1, num_samples // schedule.global_batch_size)
    total = schedule.steps or max(1, round(schedule.epochs * per_epoch))
    if schedule.warmup_steps >= 0:
        warmup = schedule.warmup_steps
    elif schedule.steps:
        warmup = round(total * schedule.warmup_epochs / schedule.epochs)
    else:
        warmup = round(schedule.warmup_epochs * per_epoch)
    return StepPlan(per_epoch, total, min(warmup, total - 1))


def lr_at(step: int, cfg: OptimConfig, plan: StepPlan) -> float:
    """LR for optimizer step `step` (0-based): linspace(0, lr) over warmup, then half-cosine to min_lr."""
    if step < plan.warmup_steps:
        return cfg.lr * step / max(plan.warmup_steps - 1, 1)
    decay_steps = max(plan.total_steps - plan.warmup_steps, 1)
    progress = min(step - plan.warmup_steps, decay_steps) / decay_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.endswith("gamma"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups, as ``optim.implementation`` asks.

    ``auto`` is torch's AdamW: fused on CUDA, foreach on CPU. DeepSpeed's FusedAdam is only used when asked
    for (``deepspeed_fused``): it is JIT-compiled at run time (an nvcc of torch's CUDA version, a failed
    build only warns) and buys nothing here, since each rank updates only its Ψ/N partition.
    """
    groups = param_groups(model, cfg.weight_decay)
    impl = cfg.implementation
    if impl == "deepspeed_fused":
        from pretrain.engine.deepspeed import fused_adam_class

        return fused_adam_class()(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
    fused = impl == "torch_fused" or (impl == "auto" and on_cuda)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))
