"""Training/eval image transforms and batch mixing, built from timm's factories (not re-implemented).

The ConvNeXt recipe (RandomResizedCrop + flip + RandAugment + RandomErasing, then Mixup/CutMix with
label smoothing) is exactly what timm's ``create_transform`` and ``Mixup`` implement and what the
released weights were trained with, so this module only maps :class:`DataConfig` fields onto them.
Every size and probability comes from the config.

Targets are always soft: with Mixup/CutMix enabled, ``Mixup`` returns mixed, smoothed one-hot targets;
with both alphas at 0, :func:`build_mixup` returns ``None`` and the training step must call
:func:`smooth_one_hot` instead, so the loss is always soft-target cross-entropy. Note that timm's
``Mixup(mode='batch')`` requires an even micro-batch size.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.mixup import mixup_target

from pretrain.config import DataConfig


def build_train_transform(cfg: DataConfig, uint8: bool = False) -> Callable:
    """PIL RGB image -> normalized float tensor (3, image_size, image_size), randomly augmented.

    With ``uint8=True`` (the training loaders) the image stops before normalization, as timm's own
    GPU-prefetcher path: a uint8 (image_size, image_size, 3) tensor, channels last; normalization and
    random erasing then run on the training device (:class:`DeviceAugment`). Batches cross shared memory
    and PCIe at 1 byte per value instead of 4.

    timm turns colour jitter off when a RandAugment policy is given (as in the ConvNeXt recipe), so
    ``cfg.color_jitter`` only takes effect with ``cfg.randaugment = ""``.
    """
    transform = create_transform(
        input_size=cfg.image_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.randaugment or None,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=cfg.random_erasing,
        re_mode=cfg.random_erasing_mode,
        re_count=1,
        use_prefetcher=uint8,
    )
    _patch_posterize(transform)
    return _ChannelsLast(transform) if uint8 else transform


class _ChannelsLast:
    """(3, H, W) uint8 -> (H, W, 3): stacking these gives a channels-last (N, H, W, 3) batch."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image).permute(1, 2, 0)  # (C, H, W) -> (H, W, C)

    def __repr__(self) -> str:
        return f"{self.transform!r} -> channels last"


class DeviceAugment:
    """The end of the transform, on the training device: uint8 (N, H, W, 3) -> normalized float
    (N, 3, H, W) in channels-last memory, then timm's RandomErasing per sample (as timm's prefetcher).

    Normalization is the same arithmetic as ``ToTensor`` + ``Normalize`` (x / 255, - mean, / std), so on
    the same device the result is identical. Random erasing draws from Python's ``random`` and the
    device's torch generator, which checkpoints save and restore (exact resume).
    """

    def __init__(self, cfg: DataConfig, device: torch.device, train: bool = True):
        from timm.data.random_erasing import RandomErasing

        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
        self.erase = (RandomErasing(cfg.random_erasing, mode=cfg.random_erasing_mode, max_count=1, device=device)
                      if train and cfg.random_erasing > 0 else None)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W), channels-last memory
        x = x.float().div_(255.0).sub_(self.mean).div_(self.std)
        return self.erase(x) if self.erase is not None and len(x) else x


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, with Pillow < 13 semantics for 0 bits (a black image). Pillow 13 raises
    ValueError for bits=0, which timm's PosterizeIncreasing produces at magnitude 10 -- with
    'rand-m9-mstd0.5' about 1 in 300 training images would fail."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Callable) -> None:
    """Swap timm's posterize for :func:`_posterize` in the RandAugment/AutoAugment/AugMix ops."""
    for t in getattr(transform, "transforms", []):
        ops = list(getattr(t, "ops", []))
        for sub_policy in getattr(t, "policy", []):
            ops += list(sub_policy)
        for op in ops:
            if isinstance(op, AugmentOp) and op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize


def build_eval_transform(cfg: DataConfig, uint8: bool = False) -> Callable:
    """Resize the short side to image_size / crop_pct, center-crop image_size, normalize (``uint8``: as
    :func:`build_train_transform`, normalized on the device by ``DeviceAugment(train=False)``)."""
    transform = create_transform(
        input_size=cfg.image_size,
        is_training=False,
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        use_prefetcher=uint8,
    )
    return _ChannelsLast(transform) if uint8 else transform


def build_mixup(cfg: DataConfig, num_classes: int) -> Mixup | None:
    """timm Mixup/CutMix on whole batches with label smoothing; None when both alphas are 0."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Integer labels (B,) -> smoothed one-hot targets (B, num_classes) that sum to 1 (timm's convention)."""
    return mixup_target(labels.long(), num_classes, lam=1.0, smoothing=smoothing)
