"""Semantic segmentation (ADE20K-style): ConvNeXt + UperNet, trained like pretraining.

The model is :class:`pretrain.models.upernet.ConvNeXtUperNet`; the loss is the `segmentation` section's
weighted sum of pixel-wise cross-entropy, soft Dice, soft IoU and Lovász-softmax on the main head
(resized to the mask), plus ``aux_weight`` x cross-entropy on the auxiliary FCN head, as the official
configs (0.4). 255 is the ignore label everywhere (masks, padding, ``reduce_zero_label``). Metrics are
mIoU / mAcc / aAcc from a confusion matrix all-reduced over ranks (mmseg's definitions).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pretrain.config import DataConfig, ModelConfig, SegmentationConfig
from pretrain.data.batch import Batch
from pretrain.data.segmentation import IGNORE, SegmentationDecoder
from pretrain.data.shards import Manifest
from pretrain.data.transforms import DeviceAugment
from pretrain.evaluate import evaluate_segmentation
from pretrain.models import create_model
from pretrain.models.upernet import ConvNeXtUperNet, resize_to
from pretrain.objectives import segmentation_loss
from pretrain.tasks.base import Task


class SegmentationTask(Task):
    name = "segmentation"

    def __init__(self, model: ModelConfig, data: DataConfig, seg: SegmentationConfig, manifest: Manifest,
                 device: torch.device):
        self.model_cfg, self.data_cfg, self.seg = model, data, seg
        self.manifest = manifest
        self.prepare = DeviceAugment(data, device, train=False)  # normalization only: no random erasing
        self.weights = {"ce": seg.ce_weight, "dice": seg.dice_weight, "iou": seg.iou_weight,
                        "lovasz": seg.lovasz_weight}
        self.class_weights = (torch.tensor(seg.class_weights, device=device) if seg.class_weights else None)

    def build_model(self) -> torch.nn.Module:
        m = self.model_cfg
        backbone = create_model(m.name, num_classes=m.num_classes, drop_path_rate=m.drop_path_rate,
                                layer_scale_init=m.layer_scale_init, checkpoint_stages=m.checkpoint_stages)
        return ConvNeXtUperNet(backbone, m.num_classes, self.seg.channels, self.seg.aux_channels,
                               aux=self.seg.aux_weight > 0)

    def load_pretrained(self, model: torch.nn.Module, source, cfg: ModelConfig, classes: list[str],
                        storage_cfg) -> None:
        from pretrain.init_from import initialize_backbone

        initialize_backbone(model.backbone, cfg, storage_cfg, source)  # heads stay freshly initialised

    def decoder(self, train: bool) -> SegmentationDecoder:
        size = self.data_cfg.image_size
        return SegmentationDecoder.of(self.manifest, train, self.model_cfg.num_classes, crop_size=size,
                                      scale=tuple(self.seg.scale), ratio_range=tuple(self.seg.ratio_range),
                                      cat_max_ratio=self.seg.cat_max_ratio, hflip=0.5 if self.data_cfg.hflip else 0.0,
                                      photometric=self.seg.photometric)

    def inputs(self, batch: Batch, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, Any]:
        x = self.prepare(batch.image.to(device, non_blocking=True))  # uint8 NHWC -> normalized NCHW float
        if not self.model_cfg.channels_last:
            x = x.contiguous()
        return x.to(dtype), batch.target.to(device, non_blocking=True)

    def loss(self, output: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        size = target.shape[-2:]
        total, _ = segmentation_loss(resize_to(output["out"], size), target, self.weights, IGNORE, self.class_weights)
        if "aux" in output:
            aux, _ = segmentation_loss(resize_to(output["aux"], size), target, {"ce": 1.0}, IGNORE, self.class_weights)
            total = total + self.seg.aux_weight * aux
        return total

    def zero_loss(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(v.float().sum() for v in output.values()) * 0.0

    def evaluate(self, forward: Callable, batches, dtype: torch.dtype) -> dict[str, float]:
        scores = evaluate_segmentation(forward, batches, self.prepare, dtype, self.model_cfg.num_classes, IGNORE)
        return {k: v for k, v in scores.items() if not isinstance(v, list)}  # per-class lists: not scalars

    def describe(self, results: dict[str, dict[str, float]]) -> str:
        summary = ", ".join(f"{which} mIoU {r['mIoU']:.1%} aAcc {r['aAcc']:.1%}" for which, r in results.items())
        return f"{int(results['model']['pixels'])} held-out pixels: {summary}"
