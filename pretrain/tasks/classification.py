"""Image classification (ImageNet-22k/1k pretraining and fine-tuning): the first Task.

Soft-target cross-entropy against timm's mixup/cutmix targets with label smoothing; top-1/top-5
held-out accuracy, and for a 22k head also ImageNet-1k accuracy over the 1k synsets' logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pretrain.config import DataConfig, ModelConfig
from pretrain.data.batch import Batch
from pretrain.data.decode import decode_rgb
from pretrain.data.reader import (IMAGE_FIELDS, SKIP_BAD_LABEL, SKIP_DECODE_ERROR, SKIP_MISSING_IMAGE, RawSample,
                                  Skipped)
from pretrain.data.transforms import (DeviceAugment, build_eval_transform, build_mixup, build_train_transform,
                                      smooth_one_hot)
from pretrain.evaluate import evaluate, in1k_subset
from pretrain.models import create_model
from pretrain.objectives import soft_target_cross_entropy
from pretrain.data.decoder import SampleDecoder
from pretrain.tasks.base import Task


@dataclass
class ClassDecoder(SampleDecoder):
    """`cls` label + the first image field of a sample, through `transform`."""

    num_classes: int
    transform: Callable

    @classmethod
    def of(cls, data: DataConfig, num_classes: int, train: bool) -> "ClassDecoder":
        """timm's train (augmenting) or eval transform, stopping at uint8 (normalized on the device)."""
        return cls(num_classes, (build_train_transform if train else build_eval_transform)(data, uint8=True))

    def __call__(self, raw: RawSample) -> tuple[torch.Tensor, int] | Skipped:
        image_field = next((f for f in IMAGE_FIELDS if f in raw.fields), None)
        if image_field is None:
            return Skipped(SKIP_MISSING_IMAGE)
        try:
            label = int(raw.fields["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            return Skipped(SKIP_BAD_LABEL)
        if not 0 <= label < self.num_classes:
            return Skipped(SKIP_BAD_LABEL)
        try:
            image = decode_rgb(raw.fields[image_field])
        except Exception:  # any decoder failure is a corrupt sample, counted and skipped
            return Skipped(SKIP_DECODE_ERROR)
        return self.transform(image), label


class ClassificationTask(Task):
    name = "classification"

    def __init__(self, model: ModelConfig, data: DataConfig, classes: list[str], label_source: str,
                 device: torch.device):
        self.model_cfg, self.data_cfg = model, data
        self.mixup = build_mixup(data, model.num_classes)
        self.augment = DeviceAugment(data, device)
        self.eval_augment = DeviceAugment(data, device, train=False)
        # A 22k head is also scored on ImageNet-1k (its 1k synsets' logits).
        self.subset_1k = in1k_subset(classes) if label_source == "imagenet22k_synsets" else None

    def build_model(self) -> torch.nn.Module:
        m = self.model_cfg
        return create_model(m.name, num_classes=m.num_classes, drop_path_rate=m.drop_path_rate,
                            layer_scale_init=m.layer_scale_init, head_init_scale=m.head_init_scale,
                            checkpoint_stages=m.checkpoint_stages)

    def decoder(self, train: bool) -> ClassDecoder:
        return ClassDecoder.of(self.data_cfg, self.model_cfg.num_classes, train)

    def inputs(self, batch: Batch, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, Any]:
        x = self.augment(batch.image.to(device, non_blocking=True))  # uint8 NHWC -> normalized NCHW float
        y = batch.target.to(device, non_blocking=True)
        if not self.model_cfg.channels_last:
            x = x.contiguous()
        if self.mixup is not None and len(y):
            # timm's Mixup draws from numpy's global RNG: seeded per micro-batch for exact resume.
            np.random.seed(seed % 2**32)
            x, target = self.mixup(x, y)
        else:
            target = smooth_one_hot(y, self.model_cfg.num_classes, self.data_cfg.label_smoothing)
        return x.to(dtype), target

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(output, target)

    def evaluate(self, forward: Callable, batches, dtype: torch.dtype) -> dict[str, float]:
        return evaluate(forward, batches, self.eval_augment, dtype, self.subset_1k)

    def describe(self, results: dict[str, dict[str, float]]) -> str:
        summary = ", ".join(f"{which} top-1 {r['top1']:.1%} top-5 {r['top5']:.1%}" for which, r in results.items())
        return (f"{int(results['model']['samples'])} held-out samples: {summary} "
                f"(chance {1 / self.model_cfg.num_classes:.1%})")
