"""UperNet on a ConvNeXt backbone, as the official ConvNeXt semantic_segmentation configs build it.

Follows facebookresearch/ConvNeXt ``semantic_segmentation/`` (``_base_/models/upernet_convnext.py``,
``backbone/convnext.py``) and mmseg 0.x's ``UPerHead`` / ``FCNHead`` / ``PPM`` / mmcv ``ConvModule``:
per-output LayerNorm on the 4 stage maps, PPM (pool scales 1, 2, 3, 6) on the last one, FPN fusion of
all four, a 3x3 fpn_bottleneck, Dropout2d(0.1) and a 1x1 classifier; auxiliary FCNHead (one 3x3 conv
module) on the stride-16 map. Head parameter names follow mmseg's code
(``decode_head.psp_modules.0.1.conv.weight``, ``auxiliary_head.conv_seg.weight``, ...), so an official
checkpoint's head keys should line up (not checked against a real file). Its backbone has the official
names (``downsample_layers.*``; ``backbone.norm{i}`` is our ``out_norms.{i}``); ours are timm's.

Normalisation: the official config uses SyncBN; here each rank normalizes its own micro-batch
(:class:`BatchNorm2d`, computed in fp32). PPM's 1x1 pool has one value per channel per image, so
training needs more than one image per rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.convnext import LN_EPS, ConvNeXt


def resize_to(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (align_corners=False, as the official configs) resize of (N, K, h, w) to (N, K, *size);
    returns the input itself when it already has that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in fp32 whatever the input dtype, output in the input's dtype.

    DeepSpeed's bf16/fp16 modes cast parameters but keep buffers (the running statistics) in fp32, a
    mix torch's kernels refuse; fp32 statistics are also what mixed-precision training wants. Same
    parameters, buffers and semantics as ``nn.BatchNorm2d`` (momentum, tracked running statistics).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                            self.training, self.momentum, self.eps).to(x.dtype)


class ConvModule(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU: mmcv's ``ConvModule`` with norm_cfg BN/SyncBN, same names
    (``conv``, ``bn``) and init (Kaiming normal fan_out for the conv, BN weight 1, bias 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class _DecodeHead(nn.Module):
    """mmseg's ``BaseDecodeHead.cls_seg``: Dropout2d then a 1x1 classifier, init normal(0, 0.01), bias 0."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UperNetHead(_DecodeHead):
    """mmseg ``UPerHead``: (N, C_i, H/s_i, W/s_i) for s = 4, 8, 16, 32 -> logits (N, K, H/4, W/4).

    Args:
        in_channels: Channels of the 4 input maps (the backbone's ``dims``).
        num_classes: Output classes K.
        channels: Width of every PPM / lateral / FPN conv (512 in the official configs).
        pool_scales: PPM adaptive-pool output sizes on the last map.
        dropout: Dropout2d before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1)) for s in pool_scales)
        self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Last map + its pooled, upsampled context -> (N, channels, H/32, W/32)."""
        size = x.shape[-2:]
        pooled = [resize_to(ppm(x), size) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))  # (N, C_3 + S * channels, h, w)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the upsampled coarser level
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([resize_to(o, size) for o in outs], dim=1)  # (N, 4 * channels, H/4, W/4)
        return self.cls_seg(self.fpn_bottleneck(fused))


class FCNHead(_DecodeHead):
    """mmseg ``FCNHead`` with num_convs=1, concat_input=False: 3x3 conv module -> dropout -> 1x1
    classifier; (N, in_channels, h, w) -> (N, K, h, w)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))


class ConvNeXtUperNet(nn.Module):
    """ConvNeXt backbone + per-output LayerNorm + UperNet head (+ FCN auxiliary head on stage index 2).

    Keys: ``backbone.<classification key>`` (the ConvNeXt state dict without ``head.*``, so pretrained
    weights load by prefix); ``out_norms.*``, ``decode_head.*``, ``auxiliary_head.*`` are not pretrained.

    ``forward(x)`` with x (N, 3, H, W) returns ``{"out": (N, K, H/4, W/4)}``, plus
    ``"aux": (N, K, H/16, W/16)`` in training when ``aux``; the caller resizes with :func:`resize_to`
    (mmseg also resizes logits to the label size before the loss and metrics).

    Args:
        backbone: A ConvNeXt; its classification head is removed (the official segmentation backbone has
            none). Build it with the segmentation recipe's drop_path / layer_scale_init (1.0 officially).
        num_classes: Output classes K.
        channels: UperNet width (512 officially).
        aux_channels: FCN auxiliary head width (256 officially).
        aux: Build the auxiliary head (its loss weight, 0.4 officially, is the trainer's).
    """

    def __init__(self, backbone: ConvNeXt, num_classes: int, channels: int = 512, aux_channels: int = 256,
                 aux: bool = True):
        super().__init__()
        backbone.head = nn.Identity()
        backbone.num_classes = 0
        self.backbone = backbone
        dims = backbone.dims
        # The official backbone's norm{i}: channels-first LayerNorm over C, eps 1e-6.
        self.out_norms = nn.ModuleList(nn.LayerNorm(d, eps=LN_EPS) for d in dims)
        self.decode_head = UperNetHead(dims, num_classes, channels)
        self.auxiliary_head = FCNHead(dims[2], num_classes, aux_channels) if aux else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Stage maps are (N, C, h, w) views of channels-last memory: permuting to (N, h, w, C) is free and
        # lets LayerNorm run over contiguous rows; permuting back keeps channels-last memory for the convs.
        feats = [norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                 for norm, f in zip(self.out_norms, self.backbone.forward_stages(x))]
        out = {"out": self.decode_head(feats)}
        if self.training and self.auxiliary_head is not None:
            out["aux"] = self.auxiliary_head(feats[2])
        return out
