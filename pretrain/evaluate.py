"""Held-out top-1/top-5, and ImageNet-1k accuracy of 22k-class heads (logits restricted to the 1k synsets)."""

from __future__ import annotations

import numpy as np
import torch

from pretrain.data.shards import load_synsets
from pretrain.data.transforms import DeviceAugment
from pretrain.engine.distributed import all_reduce_sum


def in1k_subset(classes: list[str]) -> np.ndarray | None:
    """Indices of the ImageNet-1k synsets within `classes` (22k heads), in 1k order; None otherwise.

    timm's 21,841-synset list lacks one 1k synset (n04399382, "teddy bear"), so 22k heads are scored
    over the other 999; samples of a missing class are not counted.
    """
    positions = {name: i for i, name in enumerate(classes)}
    present = [positions[s] for s in load_synsets("imagenet_synsets") if s in positions]
    if len(present) < 990:
        return None
    return np.array(present, dtype=np.int64)


@torch.no_grad()
def evaluate(forward, batches, prepare: DeviceAugment, dtype: torch.dtype,
             subset_1k: np.ndarray | None) -> dict[str, float]:
    """Top-k accuracy over all ranks. `batches` (uint8 images) must yield the same number of batches on every
    rank; `prepare` normalizes them on the device (channels-last)."""
    correct1 = correct5 = total = 0.0
    sub1 = sub5 = sub_total = 0.0
    device = prepare.mean.device
    subset = torch.as_tensor(subset_1k, device=device) if subset_1k is not None else None
    for batch in batches:
        x = prepare(batch.image.to(device, non_blocking=True))
        y = batch.target.to(device)
        logits = forward(x.to(dtype)).float()
        if len(y) == 0:
            continue
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(dim=1).sum().item()
        total += len(y)
        if subset is not None:
            # Samples whose class is one of the 1k synsets, scored over the 1k logits only.
            match = subset[None, :] == y[:, None]
            keep = match.any(dim=1)
            if keep.any():
                target = match[keep].float().argmax(dim=1)
                sub_top5 = logits[keep][:, subset].topk(5, dim=1).indices
                sub1 += (sub_top5[:, 0] == target).sum().item()
                sub5 += (sub_top5 == target[:, None]).any(dim=1).sum().item()
                sub_total += int(keep.sum().item())
    correct1, correct5, total, sub1, sub5, sub_total = all_reduce_sum(
        [correct1, correct5, total, sub1, sub5, sub_total], device)
    out = {"top1": correct1 / max(total, 1), "top5": correct5 / max(total, 1), "samples": total}
    if subset is not None and sub_total:
        out.update(in1k_top1=sub1 / sub_total, in1k_top5=sub5 / sub_total, in1k_samples=sub_total)
    return out
