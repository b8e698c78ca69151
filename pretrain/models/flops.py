"""Analytic FLOP counts for throughput / MFU reporting, without running real compute.

The model is copied onto the ``meta`` device (parameters are swapped for meta tensors during the copy,
so no weight memory is duplicated) and one image is pushed through under ``FlopCounterMode``, which
counts 2 FLOPs per multiply-accumulate of convs and matmuls (norms, activations and adds are ignored,
as in timm's / the paper's GMACs, which are half our number).

Training FLOPs per image are taken as 3x the forward (backward = 2x forward: grads w.r.t. inputs and
weights). That is the *model* FLOPs used for MFU; activation checkpointing re-runs the forward of the
checkpointed blocks, so the hardware does up to 4x, which MFU deliberately does not credit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

TRAIN_FLOPS_FACTOR = 3
"""Training (forward + backward) FLOPs = TRAIN_FLOPS_FACTOR x forward FLOPs."""


def _meta_copy(model: nn.Module) -> nn.Module:
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def flops_per_image(model: nn.Module, image_size: int | tuple[int, int], in_chans: int | None = None) -> int:
    """Forward FLOPs (2 x MACs) for one image, counted on a meta-device copy in eval mode.

    Args:
        model: Any image model (left untouched).
        image_size: Input side, or (height, width).
        in_chans: Input channels; defaults to ``model.in_chans`` or 3.

    Returns:
        Forward FLOPs per image; multiply by ``TRAIN_FLOPS_FACTOR`` for a training step.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    chans = in_chans or getattr(model, "in_chans", 3)
    meta = _meta_copy(model).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, chans, h, w, device="meta"))
    return int(counter.get_total_flops())


def train_flops_per_image(model: nn.Module, image_size: int | tuple[int, int],
                          in_chans: int | None = None) -> int:
    """Forward + backward FLOPs per image: ``TRAIN_FLOPS_FACTOR * flops_per_image``."""
    return TRAIN_FLOPS_FACTOR * flops_per_image(model, image_size, in_chans)
