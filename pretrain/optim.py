"""AdamW parameter groups and the per-step learning-rate schedule (linear warmup, cosine to min_lr).

Matches the official ConvNeXt code (``optim_factory.py``, ``engine.py``): no weight decay on 1-D
parameters (LayerNorm weights, biases, layer-scale gamma); with layer-wise LR decay (fine-tuning) one
group per (layer, decay or not), each with an ``lr_scale`` that multiplies the scheduled LR. The schedule
is a pure function of the optimizer step, so resuming needs no scheduler state and the LR position is
restored with the step count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
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


def num_layers(depths: Sequence[int]) -> int:
    """The layer of stage 3 (the official ``num_layers``, 12 for [3, 3, 27, 3]); the head is one above."""
    return 4 + (depths[2] - 1) // 3


def layer_id(name: str, depths: Sequence[int]) -> int:
    """The layer of parameter `name` (our = timm's names) in the official ConvNeXt numbering.

    facebookresearch/ConvNeXt ``optim_factory.get_num_layer_for_convnext`` on the official names: stem
    (``downsample_layers.0``) 0; stage 0 blocks 1; stage 1 and its downsampling 2; stage 2 blocks in
    groups of three, ``3 + block // 3``, its downsampling 3; stage 3 and its downsampling 12; the rest
    (final norm, classifier) 13. timm's own layer-decay grouping (one layer per block) is another rule,
    so this is not delegated to timm. The official code asserts a 27-block stage 2 (S/B/L/XL); for other
    depths stage 3 comes right after the last stage-2 group (T: 6, as the official detection code numbers
    T), so the rule is one function of the depths.
    """
    if name.startswith("stem."):
        return 0
    match = re.match(r"stages\.(\d+)\.(?:downsample|blocks\.(\d+))\.", name)
    if match is None:
        return num_layers(depths) + 1
    stage = int(match[1])
    if stage == 3:
        return num_layers(depths)
    if stage == 2 and match[2] is not None:
        return 3 + int(match[2]) // 3
    return stage + 1


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups as the official ``get_parameter_groups``: weight decay 0 for 1-D parameters and biases.

    With ``layer_decay < 1``, one group per (layer, decay or not) in order of first appearance, each with
    ``lr_scale = layer_decay ** (num_layers + 1 - layer)`` (1 for the head); otherwise the two groups of
    pretraining (decay, no decay), ``lr_scale`` 1.
    """
    depths = [len(stage.blocks) for stage in model.stages] if layer_decay < 1 else None
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias"))
        layer = layer_id(name, depths) if depths else 0
        if (layer, decay) not in groups:
            scale = layer_decay ** (num_layers(depths) + 1 - layer) if depths else 1.0
            groups[(layer, decay)] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[(layer, decay)]["params"].append(param)
    return list(groups.values())


def apply_lr_scale(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make every step use ``lr x lr_scale`` per group, whoever sets the groups' ``lr``.

    The trainer writes the scheduled LR into every group (through DeepSpeed's wrapper, which steps the
    same group dicts, one group at a time under ZeRO-1/2); the scale is applied for the duration of each
    step and undone after it, so ``lr`` always reads back as the schedule's value (the head's LR).
    """
    scheduled: dict[int, float] = {}

    def scale(opt: torch.optim.Optimizer, *_) -> None:
        for group in opt.param_groups:
            scheduled[id(group)] = group["lr"]
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)

    def restore(opt: torch.optim.Optimizer, *_) -> None:
        for group in opt.param_groups:
            group["lr"] = scheduled.pop(id(group), group["lr"])

    optimizer.register_step_pre_hook(scale)
    optimizer.register_step_post_hook(restore)
    return optimizer


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups, as ``optim.implementation`` asks.

    ``auto`` is torch's AdamW: fused on CUDA, foreach on CPU. DeepSpeed's FusedAdam is only used when asked
    for (``deepspeed_fused``): it is JIT-compiled at run time (an nvcc of torch's CUDA version, a failed
    build only warns) and buys nothing here, since each rank updates only its Ψ/N partition.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    impl = cfg.implementation
    if impl == "deepspeed_fused":
        from pretrain.engine.deepspeed import fused_adam_class

        return apply_lr_scale(fused_adam_class()(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True))
    fused = impl == "torch_fused" or (impl == "auto" and on_cuda)
    return apply_lr_scale(torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                            **({"fused": True} if fused else {"foreach": True})))
