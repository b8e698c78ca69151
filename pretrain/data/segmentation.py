"""Semantic-segmentation samples: decode ``jpg`` + ``png`` label mask, augment both jointly, collate.

The pipeline is mmseg's ADE20K pipeline (mmseg 0.x ``datasets/pipelines/transforms.py``, the one the
official ConvNeXt UperNet results were trained with), step for step, minus ``Normalize``, which runs on
the training device as for classification (batches stay uint8 (N, H, W, 3) across shared memory):

* train: ``Resize(img_scale=scale, ratio_range, keep_ratio=True)`` -> ``RandomCrop(crop_size,
  cat_max_ratio)`` -> ``RandomFlip(hflip)`` -> ``PhotoMetricDistortion`` -> ``Pad(crop_size)``;
* eval: ``Resize(scale, keep_ratio=True)`` (short side to ``min(scale)`` unless the long side would pass
  ``max(scale)``), no crop, padded bottom/right to a multiple of ``size_divisor``.
  This is whole-image inference input; sliding-window inference is the task's option, not the
  decoder's. The mask is resized with the image, so eval metrics are computed at the resized
  resolution (mmseg resizes predictions back to the original mask instead).

Masks are always resized nearest-neighbour and padded with :data:`IGNORE` (255). Images are padded
with ``pad_value``, the ImageNet mean in uint8 by default: mmseg pads *after* ``Normalize`` with 0,
i.e. with the mean colour, and our normalization comes later, on the device. Every random draw is
from numpy's global RNG, as in mmseg (``from numpy import random``): the loader seeds it per sample,
which gives exact resume.

Why PIL + numpy and not ``torchvision.transforms.v2``: v2 would carry the mask through resize, crop and
flip correctly (``tv_tensors.Mask``), but it has neither the ``cat_max_ratio`` crop nor mmseg's
photometric distortion (additive brightness, multiplicative contrast, saturation and hue in HSV
units, contrast before or after them at random), so half the pipeline would be hand-written anyway.
Two deliberate deviations, as cv2 is not a dependency: resizing is PIL bilinear (antialiased when
shrinking, unlike cv2's), and the HSV round trip is PIL's (hue in 1/255 turns; mmseg's hue delta of 18
cv2 units, 36 degrees, becomes 25.5 of them, rounded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from pretrain.data.decode import UndecodableImage, decode_rgb, open_image
from pretrain.data.reader import (IMAGE_FIELDS, SKIP_BAD_LABEL, SKIP_DECODE_ERROR, SKIP_MISSING_IMAGE,
                                  SKIP_MISSING_MASK, RawSample, Skipped)
from pretrain.data.shards import Manifest
from pretrain.data.decoder import SampleDecoder

IGNORE = 255
"""Mask value of pixels that count for nothing (unlabelled, padding, ADE's 'other' after reduction)."""
MASK_FIELD = "png"
MASK_MODES = ("L", "P")
"""8-bit single-channel masks; a palette image's indices are its labels (PASCAL VOC style)."""
REASON_BAD_MASK = "bad_mask"


def open_mask(data: bytes) -> Image.Image:
    """Decode an 8-bit label mask (``L``, or ``P`` whose indices are the labels), raising
    :class:`UndecodableImage` (reason ``bad_mask`` for other modes: colour-coded or 16-bit masks are not
    label maps). Shared by make-shards, verify and the decoder so all three accept the same masks."""
    mask = open_image(data)
    if mask.mode not in MASK_MODES:
        raise UndecodableImage(REASON_BAD_MASK, f"mode {mask.mode}; label masks must be 8-bit L or P")
    return mask


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """ADE20K's convention as mmseg applies it: 0 ("other") -> 255, k -> k - 1, 255 stays 255."""
    out = mask.astype(np.uint8, copy=True)
    out[out == 0] = IGNORE
    out -= 1
    out[out == IGNORE - 1] = IGNORE
    return out


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale``'s (w, h): the largest factor fitting the long side in ``max(scale)`` and the
    short side in ``min(scale)``, sizes rounded half up."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _resize(image: Image.Image, mask: np.ndarray, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    if size == image.size:
        return image, mask
    return (image.resize(size, Image.BILINEAR),
            np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)))


def random_crop(image: np.ndarray, mask: np.ndarray, crop: tuple[int, int],
                cat_max_ratio: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: a random (h, w) window (cut to the image); with ``cat_max_ratio < 1`` it is
    redrawn up to 10 times until the crop holds more than one labelled class and no class covers
    ``cat_max_ratio`` or more of its labelled pixels (mmseg keeps the 11th draw unchecked)."""
    def bbox() -> tuple[int, int]:
        return (np.random.randint(0, max(mask.shape[0] - crop[0], 0) + 1),
                np.random.randint(0, max(mask.shape[1] - crop[1], 0) + 1))

    y, x = bbox()
    if cat_max_ratio < 1:
        for _ in range(10):
            labels, counts = np.unique(mask[y:y + crop[0], x:x + crop[1]], return_counts=True)
            counts = counts[labels != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = bbox()
    return image[y:y + crop[0], x:x + crop[1]], mask[y:y + crop[0], x:x + crop[1]]


def _scaled(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: x * alpha + beta, clipped, truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_channel(image: np.ndarray, channel: int, fn) -> np.ndarray:
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    hsv[..., channel] = fn(hsv[..., channel])
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def photometric_distortion(image: np.ndarray, brightness_delta: int = 32,
                           contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on a uint8 RGB (H, W, 3) array, with its draws in its order:
    brightness (+U(-32, 32)), then contrast (x U(0.5, 1.5)) either first or last, saturation
    (x U(0.5, 1.5)) and hue (+randint(-18, 18) cv2 units), each applied with probability 0.5."""
    if np.random.randint(2):
        image = _scaled(image, beta=np.random.uniform(-brightness_delta, brightness_delta))
    contrast_first = np.random.randint(2)
    if contrast_first and np.random.randint(2):
        image = _scaled(image, alpha=np.random.uniform(*contrast))
    if np.random.randint(2):
        alpha = np.random.uniform(*saturation)
        image = _hsv_channel(image, 1, lambda s: _scaled(s, alpha))
    if np.random.randint(2):
        shift = round(np.random.randint(-hue_delta, hue_delta) * 255 / 180)  # cv2 hue units -> PIL's
        image = _hsv_channel(image, 0, lambda h: ((h.astype(np.int32) + shift) % 255).astype(np.uint8))
    if not contrast_first and np.random.randint(2):
        image = _scaled(image, alpha=np.random.uniform(*contrast))
    return image


def pad_to(image: np.ndarray, mask: np.ndarray, height: int, width: int,
           value: tuple[int, int, int] = (0, 0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to (height, width): image with `value`, mask with :data:`IGNORE` (mmseg ``Pad``)."""
    dh, dw = height - mask.shape[0], width - mask.shape[1]
    if dh <= 0 and dw <= 0:
        return image, mask
    out = np.empty((max(height, mask.shape[0]), max(width, mask.shape[1]), 3), np.uint8)
    out[...] = np.asarray(value, np.uint8)
    out[:image.shape[0], :image.shape[1]] = image
    return out, np.pad(mask, ((0, max(dh, 0)), (0, max(dw, 0))), constant_values=IGNORE)


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class SegmentationTransform:
    """The joint (image, mask) transform; (PIL RGB image, uint8 (H, W) mask) -> (uint8 (H, W, 3),
    uint8 (H, W)) arrays. Defaults are the official ADE20K 512 setup."""

    train: bool
    crop_size: tuple[int, int] = (512, 512)
    """(h, w) of training crops (padded up to it when the rescaled image is smaller)."""
    scale: tuple[int, int] = (2048, 512)
    """mmseg's ``img_scale`` (long, short): the base size that ``ratio_range`` scales (train) or the
    eval size."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    size_divisor: int = 32
    """Eval images (and masks) are padded to a multiple of it (the backbone's stride)."""
    pad_value: tuple[int, int, int] = (124, 116, 104)
    """Image padding: the ImageNet mean x 255, which device normalization maps to ~0 as mmseg's pad."""

    def __post_init__(self) -> None:  # config values may be an int or a TOML list
        object.__setattr__(self, "crop_size", _pair(self.crop_size))
        object.__setattr__(self, "scale", _pair(self.scale))

    def pad(self, image: np.ndarray, mask: np.ndarray, height: int, width: int) -> tuple[np.ndarray, ...]:
        return pad_to(image, mask, height, width, self.pad_value)

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.train:
            image, mask = _resize(image, mask, rescale_size(*image.size, self.scale))
            d = self.size_divisor
            return self.pad(np.asarray(image), mask, -(-mask.shape[0] // d) * d, -(-mask.shape[1] // d) * d)
        low, high = self.ratio_range
        ratio = np.random.random_sample() * (high - low) + low
        image, mask = _resize(image, mask, rescale_size(*image.size, (int(self.scale[0] * ratio),
                                                                       int(self.scale[1] * ratio))))
        pixels, mask = random_crop(np.asarray(image), mask, self.crop_size, self.cat_max_ratio)
        if np.random.rand() < self.hflip:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels))
        return self.pad(pixels, mask, *self.crop_size)


@dataclass
class SegmentationDecoder(SampleDecoder):
    """A sample's image (its first image field other than the mask) + its ``png`` label mask -> uint8
    (H, W, 3) image tensor and int64 (H, W) mask, 255 = ignore.

    Skips (reader reasons): no image ``missing_image``; no mask ``missing_mask``; an image or mask that
    does not decode (or a mask that is not 8-bit L/P) ``decode_error``; a mask whose size is not the
    image's, or with a label >= ``num_classes`` other than 255 (after ``reduce_zero_label``),
    ``bad_label``."""

    num_classes: int
    transform: SegmentationTransform
    reduce_zero_label: bool = False
    mask_field: str = MASK_FIELD

    @classmethod
    def of(cls, manifest: Manifest, train: bool, num_classes: int = 0,
           **options: Any) -> "SegmentationDecoder":
        """The decoder of a segmentation shard set: classes (unless `num_classes` is given) and
        ``reduce_zero_label`` from its manifest; `options` are :class:`SegmentationTransform` fields."""
        if manifest.task != "segmentation":
            raise ValueError(f"shards hold a {manifest.task!r} set, not a segmentation one; build them with "
                             "`data-tools make-shards --task segmentation`")
        return cls(num_classes or manifest.num_classes, SegmentationTransform(train, **options),
                   manifest.reduce_zero_label)

    def __call__(self, raw: RawSample) -> tuple[torch.Tensor, torch.Tensor] | Skipped:
        image_field = next((f for f in IMAGE_FIELDS if f in raw.fields and f != self.mask_field), None)
        if image_field is None:
            return Skipped(SKIP_MISSING_IMAGE)
        if self.mask_field not in raw.fields:
            return Skipped(SKIP_MISSING_MASK)
        try:
            image = decode_rgb(raw.fields[image_field])
            mask = np.asarray(open_mask(raw.fields[self.mask_field]))
        except Exception:  # any decoder failure is a corrupt sample, counted and skipped
            return Skipped(SKIP_DECODE_ERROR)
        if mask.shape != (image.height, image.width):
            return Skipped(SKIP_BAD_LABEL)
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask)
        if int(np.where(mask == IGNORE, 0, mask).max(initial=0)) >= self.num_classes:
            return Skipped(SKIP_BAD_LABEL)
        pixels, mask = self.transform(image, mask)
        # copies: contiguous (flips are views) and writable (PIL-backed arrays are read-only)
        return torch.from_numpy(np.array(pixels, order="C")), torch.from_numpy(mask.astype(np.int64))

    def collate(self, images: list[torch.Tensor],
                targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack (N, H, W, 3) uint8 and (N, H, W) int64. Eval images differ in size: each is padded
        bottom/right to the batch's largest H and W (``pad_value`` / mask 255, as the per-image
        padding), so padded pixels count for nothing in losses and metrics."""
        height, width = max(t.shape[0] for t in targets), max(t.shape[1] for t in targets)
        padded = [self.transform.pad(i.numpy(), t.numpy(), height, width) for i, t in zip(images, targets)]
        return (default_collate([torch.from_numpy(i) for i, _ in padded]),
                default_collate([torch.from_numpy(t) for _, t in padded]))

    def empty_target(self) -> torch.Tensor:
        """(0, crop_h, crop_w) int64: the spatial shape of a training batch, so an empty batch's
        zero-weight loss sees consistent shapes (when ``data.image_size`` is the crop size)."""
        return torch.zeros((0, *self.transform.crop_size), dtype=torch.long)
