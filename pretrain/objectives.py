"""Training loss: cross-entropy against soft targets (mixup/cutmix and label smoothing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)), computed in fp32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
