"""Training losses: cross-entropy against soft targets (mixup/cutmix and label smoothing); segmentation
losses (pixel-wise cross-entropy, soft Dice, soft IoU, Lovász-softmax) and their weighted combination."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)), computed in fp32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# Segmentation losses. `logits` (N, K, H, W) at the label size (resize first: ``models.upernet.resize_to``),
# `target` int64 (N, H, W) with `ignore_index` on unlabelled / padded pixels. All computed in fp32.

def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                        class_weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """``F.cross_entropy``'s weighted mean, sum(w_y * nll) / sum(w_y) over non-ignored pixels, but 0 (not
    NaN, with zero gradients) when every pixel is ignored, e.g. a crop of padding only.

    mmseg 0.x's default (avg_non_ignore=False) divides by all pixels, ignored ones included; this is the
    per-labelled-pixel mean (mmseg's avg_non_ignore=True without class weights).
    """
    logits = logits.float()
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32,
                                                                device=logits.device)
    # (N, H, W), w_y * nll per pixel, 0 where ignored
    nll = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    denom = valid.sum() if weight is None else (weight[torch.where(valid, target, 0)] * valid).sum()
    return nll.sum() / torch.where(denom > 0, denom, 1).float()


def _soft_class_sums(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Per class c, summed over the non-ignored pixels of the whole batch: (sum p_c * t_c, sum p_c, sum t_c,
    counted), p = softmax, t = one-hot target. `counted` marks the classes present in the target or in
    the argmax prediction of a non-ignored pixel. No host sync."""
    probs = logits.float().softmax(dim=1)  # (N, K, H, W)
    num_classes = probs.shape[1]
    valid = target != ignore_index  # (N, H, W)
    t = torch.where(valid, target, 0)
    vf = valid.float()
    zeros = probs.new_zeros(num_classes)
    # The one-hot products as scatters over the target class (no (N, K, H, W) one-hot tensor).
    p_true = probs.gather(1, t[:, None])[:, 0] * vf  # (N, H, W): p of the true class
    inter = zeros.scatter_add(0, t.flatten(), p_true.flatten())
    t_sum = zeros.scatter_add(0, t.flatten(), vf.flatten())
    p_sum = (probs * vf[:, None]).sum((0, 2, 3))
    predicted = zeros.scatter_add(0, probs.argmax(dim=1).flatten(), vf.flatten())
    return inter, p_sum, t_sum, (t_sum > 0) | (predicted > 0)


def _mean_over_counted(loss_c: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean of per-class losses over the counted classes; 0 when none is (every pixel ignored)."""
    return (loss_c * counted).sum() / counted.sum().clamp_min(1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                   smooth: float = 1.0) -> torch.Tensor:
    """1 - mean_c (2 sum p_c t_c + smooth) / (sum p_c + sum t_c + smooth), multi-class soft Dice.

    Ignored pixels are masked out of both p and t (mmseg 0.x keeps them, as class K-1, in its
    denominator). Sums run over the whole batch (one Dice per class per batch, as mIoU accumulates over
    the dataset; mmseg averages per image). The mean is over classes present in the target or the argmax
    prediction: classes absent from both would score ~1 through the smooth term and dilute the loss,
    while predicted-but-absent classes (false positives) score ~0 and are penalised; mIoU uses the same
    rule. Denominator with plain sums (for one-hot t, sum t^2 = sum t; mmseg 0.x squares p too).
    """
    inter, p_sum, t_sum, counted = _soft_class_sums(logits, target, ignore_index)
    return _mean_over_counted(1 - (2 * inter + smooth) / (p_sum + t_sum + smooth), counted)


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  smooth: float = 1.0) -> torch.Tensor:
    """1 - mean_c (I_c + smooth) / (U_c + smooth), soft Jaccard with I_c = sum p_c t_c and
    U_c = sum p_c + sum t_c - I_c; masking, batch sums and class averaging as :func:`soft_dice_loss`."""
    inter, p_sum, t_sum, counted = _soft_class_sums(logits, target, ignore_index)
    return _mean_over_counted(1 - (inter + smooth) / (p_sum + t_sum - inter + smooth), counted)


def lovasz_softmax_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018; mmseg's LovaszLoss defaults: multi-class, classes 'present',
    per_image False): per class present in the target, the Lovász extension of the Jaccard loss on the
    errors |t_c - p_c| of the non-ignored pixels, sorted in decreasing order; mean over those classes.
    Sorts every labelled pixel once per present class, and syncs with the host once (the present classes)."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)  # (N, K, H, W) -> (N*H*W, K)
    t = target.reshape(-1)
    valid = t != ignore_index
    probs, t = probs[valid], t[valid]  # (P, K), (P,)
    classes = torch.unique(t)
    if classes.numel() == 0:
        return probs.sum() * 0.0
    fg = (t[:, None] == classes[None]).float()  # (P, C): one-hot over the present classes
    errors, order = (fg - probs[:, classes]).abs().sort(dim=0, descending=True)
    fg = fg.gather(0, order)
    gts = fg.sum(0)
    jaccard = 1 - (gts - fg.cumsum(0)) / (gts + (1 - fg).cumsum(0))  # (P, C), along the sorted errors
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])  # the Lovász extension's gradient
    return (errors * grad).sum(0).mean()


SEGMENTATION_LOSSES = {"ce": pixel_cross_entropy, "dice": soft_dice_loss, "iou": soft_iou_loss,
                       "lovasz": lovasz_softmax_loss}


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weights: Mapping[str, float],
                      ignore_index: int = 255, class_weights: torch.Tensor | Sequence[float] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_term weight * term over `weights` (keys of ``SEGMENTATION_LOSSES``; zero weights are not computed).

    Returns the total and each term's unweighted value (detached, still on the device, for logging).
    `class_weights` apply to the cross-entropy term only.

    Raises:
        ValueError: An unknown term, or logits and target of different spatial size.
    """
    if unknown := set(weights) - set(SEGMENTATION_LOSSES):
        raise ValueError(f"unknown segmentation loss terms {sorted(unknown)}; "
                         f"valid: {sorted(SEGMENTATION_LOSSES)}")
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in size; "
                         "resize the logits first")
    total = logits.new_zeros((), dtype=torch.float32)
    terms = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        kwargs = {"class_weights": class_weights} if name == "ce" else {}
        value = SEGMENTATION_LOSSES[name](logits, target, ignore_index, **kwargs)
        total = total + weight * value
        terms[name] = value.detach()
    return total, terms
