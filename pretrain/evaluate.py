"""Held-out top-1/top-5, and ImageNet-1k accuracy of 22k-class heads (logits restricted to the 1k synsets);
segmentation mIoU / per-class IoU / pixel and class accuracy from an all-reduced confusion matrix."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pretrain.data.shards import load_synsets
from pretrain.data.transforms import DeviceAugment
from pretrain.engine.distributed import all_reduce_sum
from pretrain.models.upernet import resize_to


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


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 pixel counts on the inputs' device, rows = true class, columns = predicted class;
    pixels whose target is `ignore_index` are dropped (mmseg's IoUMetric). `pred`, `target`: same shape.

    Raises:
        ValueError: A non-ignored target or a prediction outside [0, K).
    """
    valid = target != ignore_index
    index = target[valid] * num_classes + pred[valid]  # row-major (true, predicted)
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    if counts.numel() != num_classes * num_classes:
        raise ValueError(f"labels outside [0, {num_classes}) that are not ignore_index {ignore_index}")
    return counts.view(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float | list[float]]:
    """mmseg's IoUMetric from a (K, K) confusion matrix (rows true, columns predicted), as fractions
    (mmseg 1.x prints them x100).

    With I_c = M[c, c], U_c = row_c + col_c - I_c: IoU_c = I_c / U_c, NaN when U_c = 0 (class neither in
    the target nor predicted), 0 for a class predicted but absent; mIoU = nanmean(IoU), i.e. the mean
    over classes in the target or the prediction. Acc_c = I_c / row_c (NaN for classes absent from the
    target); mAcc = nanmean(Acc); aAcc = sum I_c / sum M (pixel accuracy). A mean over no class, or an
    empty matrix, is 0.0 (as ``evaluate`` reports 0 for no samples); per-class lists keep their NaNs.
    """
    m = confusion.double()
    inter, label, pred = m.diagonal(), m.sum(1), m.sum(0)
    iou = inter / (label + pred - inter)  # 0 / 0 = NaN for classes absent from both
    acc = inter / label

    def nanmean(x: torch.Tensor) -> torch.Tensor:
        return x.nan_to_num(0).sum() / (~x.isnan()).sum().clamp_min(1)

    summary = torch.stack([nanmean(iou), nanmean(acc), inter.sum() / m.sum().clamp_min(1), m.sum()])
    miou, macc, aacc, pixels = summary.tolist()
    return {"mIoU": miou, "mAcc": macc, "aAcc": aacc, "pixels": pixels,
            "IoU": iou.tolist(), "Acc": acc.tolist()}


@torch.no_grad()
def evaluate_segmentation(forward, batches, prepare: DeviceAugment, dtype: torch.dtype, num_classes: int,
                          ignore_index: int = 255) -> dict[str, float | list[float]]:
    """:func:`segmentation_scores` over all ranks. `batches` yield uint8 images (N, H, W, 3) and int64 masks
    (N, H, W) padded with `ignore_index`, the same number on every rank (empty padding batches still run
    `forward`, which may hold collectives); `forward` returns logits (N, K, h, w) or a dict with "out",
    resized bilinearly to the mask size before the argmax (as mmseg). One all-reduce of the (K, K) matrix."""
    device = prepare.mean.device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in batches:
        x = prepare(batch.image.to(device, non_blocking=True))
        y = batch.target.to(device)
        out = forward(x.to(dtype))
        if len(y) == 0:
            continue
        logits = out["out"] if isinstance(out, dict) else out
        pred = resize_to(logits.float(), y.shape[-2:]).argmax(dim=1)  # (N, K, h, w) -> (N, H, W)
        confusion += confusion_matrix(pred, y, num_classes, ignore_index)
    dist.all_reduce(confusion)
    return segmentation_scores(confusion)
