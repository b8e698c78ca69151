"""Exponential moving average of the weights, sharded exactly like the fp32 master weights.

Each rank keeps an fp32 EMA only of the parameter fragments whose masters it owns under ZeRO
(see :mod:`pretrain.engine.deepspeed`), so memory per rank is 4 bytes x params / world size and no
rank ever holds a full copy. It is updated right after every optimizer step from the fp32 masters
(not the bf16 model weights), with timm ModelEmaV3's decay rule including its optional warmup.
"""

from __future__ import annotations

import torch

from pretrain.config import EmaConfig
from pretrain.engine.deepspeed import Fragment


def ema_decay(cfg: EmaConfig, step: int) -> float:
    """Decay for the update made after optimizer step `step` (1-based), as timm's ModelEmaV3."""
    step = max(0, step - cfg.update_after_step - 1)
    if step <= 0:
        return 0.0  # the first update copies the weights
    if cfg.warmup:
        decay = 1.0 - (1.0 + step / cfg.warmup_gamma) ** -cfg.warmup_power
        return max(min(decay, cfg.decay), cfg.min_decay)
    return cfg.decay


class ShardedEma:
    """fp32 EMA tensors aligned one-to-one with this rank's master fragments."""

    def __init__(self, cfg: EmaConfig, fragments: list[Fragment]):
        self.cfg = cfg
        self.fragments = fragments
        with torch.no_grad():
            self.tensors = [f.master.detach().clone() for f in fragments]
        self.last_decay = 0.0

    @torch.no_grad()
    def update(self, step: int) -> None:
        self.last_decay = ema_decay(self.cfg, step)
        masters = [f.master for f in self.fragments]
        if not self.tensors:
            return
        # ema <- ema + (1 - decay) * (master - ema)
        torch._foreach_lerp_(self.tensors, masters, 1.0 - self.last_decay)
