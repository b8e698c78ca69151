"""ConvNeXt (Liu et al., "A ConvNet for the 2020s") as plain modules, state-dict compatible with timm.

Why this file exists instead of using timm's model directly:

* Speed. The residual stream is kept channels-last *logically* ((N, H, W, C)) between blocks, so
  LayerNorm and the MLP Linears run on contiguous rows with no copies; only the depthwise / down-
  sampling convs see an (N, C, H, W) view, which with channels-last memory is free. Layer scale,
  stochastic depth and the residual add are one ``addcmul`` pass over the activation instead of
  three. The 1x1-conv MLP of atto..nano runs as a Linear (timm runs it as a convolution). Layers are
  stock ``nn.Conv2d`` / ``F.linear`` (the CPU bf16 emulation is applied by the engine, not built in).
* DeepSpeed ZeRO-3. ZeRO-3 gathers a module's parameters only around that module's own ``forward``,
  so no forward here reads a child module's parameters (γ belongs to the block that uses it).

Keys and shapes are exactly timm's ``convnext_*`` (including the [4C, C, 1, 1] MLP weights of the
``conv_mlp`` variants atto..nano, which are computed with the same Linear path), so weights move
between the two without conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath`` semantics: survivors scaled by 1/keep)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample multiplier (N, 1, ..., 1): 0 or 1/keep; None when nothing is dropped."""
        if not self.training or self.drop_prob == 0.0:
            return None
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask(x)
        return x if mask is None else x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PointwiseLinear(nn.Linear):
    """Linear over the last (channel) dim.

    Args:
        in_features: Input channels.
        out_features: Output channels.
        conv_shape: Store the weight as [out, in, 1, 1] (timm's 1x1-conv MLP layout); the math is the
            same Linear either way.
    """

    def __init__(self, in_features: int, out_features: int, conv_shape: bool = False):
        super().__init__(in_features, out_features)
        if conv_shape:
            self.weight = nn.Parameter(self.weight.detach().reshape(out_features, in_features, 1, 1))

    linear = staticmethod(F.linear)
    """The GEMM; ``pretrain.engine.cpu_bf16.apply`` replaces it on CPUs without native bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        weight = self.weight.flatten(1)  # [out, in, 1, 1] -> [out, in]; a no-op for 2-D weights
        return self.linear(x, weight, self.bias)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on (N, H, W, C) rows."""

    def __init__(self, dim: int, hidden: int, conv_shape: bool = False):
        super().__init__()
        self.fc1 = PointwiseLinear(dim, hidden, conv_shape)
        self.act = nn.GELU()
        self.fc2 = PointwiseLinear(hidden, dim, conv_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """dwconv 7x7 -> LN -> Linear d->4d -> GELU -> Linear 4d->d -> γ -> drop path -> residual.

    Input and output are (N, H, W, C).

    Args:
        dim: Channels.
        drop_path: Stochastic-depth probability of this block.
        layer_scale_init: Initial γ; 0 disables layer scale (no ``gamma`` parameter).
        conv_mlp: Store MLP weights in timm's 1x1-conv shape.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6,
                 conv_mlp: bool = False):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 4 * dim, conv_mlp)
        gamma = torch.full((dim,), float(layer_scale_init))
        self.gamma = nn.Parameter(gamma) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x.permute(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W), channels-last memory
        x = self.norm(x.permute(0, 2, 3, 1))  # (N, C, H, W) -> (N, H, W, C)
        x = self.mlp(x)
        mask = self.drop_path.mask(x) if isinstance(self.drop_path, DropPath) else None  # (N, 1, 1, 1)
        scale = self.gamma if mask is None else mask if self.gamma is None else self.gamma * mask
        if scale is None:  # scale: [C], (N, 1, 1, 1) or (N, 1, 1, C)
            return shortcut + x
        return torch.addcmul(shortcut, x, scale)  # shortcut + γ·mask·x in one pass


class Stem(nn.Sequential):
    """Patchify: Conv 4x4 stride 4 + LN. (N, C_in, H, W) -> (N, H/4, W/4, C)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(nn.Conv2d(in_chans, dim, kernel_size=4, stride=4), nn.LayerNorm(dim, eps=LN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x).permute(0, 2, 3, 1))  # (N, C, H, W) -> (N, H, W, C)


class Downsample(nn.Sequential):
    """LN + Conv 2x2 stride 2. (N, H, W, C_in) -> (N, H/2, W/2, C_out)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.LayerNorm(in_dim, eps=LN_EPS),
                         nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[1](self[0](x).permute(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
        return x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)


class Stage(nn.Module):
    """Optional downsampling followed by ``depth`` blocks; (N, H, W, C) in and out.

    Args:
        in_dim: Input channels.
        dim: Channels of this stage.
        drop_paths: Stochastic-depth probability of each block (its length is the depth).
        layer_scale_init: Initial γ of each block.
        downsample: Whether to start with LN + 2x2 stride-2 conv (stages 1..3).
        conv_mlp: Store MLP weights in timm's 1x1-conv shape.
    """

    def __init__(self, in_dim: int, dim: int, drop_paths: Sequence[float], layer_scale_init: float = 1e-6,
                 downsample: bool = True, conv_mlp: bool = False):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, p, layer_scale_init, conv_mlp) for p in drop_paths])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and self.training:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class Head(nn.Module):
    """Global average pool -> LN -> Linear. (N, H, W, C) -> (N, num_classes)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc = PointwiseLinear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean((1, 2))))  # (N, H, W, C) -> (N, C)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNeXt(nn.Module):
    """ConvNeXt classifier / backbone with timm-identical parameter names and shapes.

    Args:
        depths: Blocks per stage.
        dims: Channels per stage.
        num_classes: Classifier outputs; 0 gives no classifier (``forward`` returns features).
        in_chans: Input image channels.
        drop_path_rate: Stochastic depth of the last block; rates rise linearly from 0 over all blocks.
        layer_scale_init: Initial layer-scale γ; 0 disables layer scale.
        head_init_scale: Multiplier on the initial classifier weight and bias.
        conv_mlp: Store MLP weights as [out, in, 1, 1] like timm's atto..nano (same math).
        checkpoint_stages: Stage indices whose blocks recompute activations in backward (training only).
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768), *,
                 num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 layer_scale_init: float = 1e-6, head_init_scale: float = 1.0, conv_mlp: bool = False,
                 checkpoint_stages: Sequence[int] = ()):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages, got depths={depths} dims={dims}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.dims = tuple(dims)
        self.num_features = dims[-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stem = Stem(in_chans, dims[0])
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(Stage(dims[max(i - 1, 0)], dim, rates[start:start + depth], layer_scale_init,
                                downsample=i > 0, conv_mlp=conv_mlp))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.head = Head(dims[-1], num_classes)
        self.apply(_init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)
        for i in checkpoint_stages:
            self.stages[i].grad_checkpointing = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in backward (all stages), like timm's method."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one (0: no classifier)."""
        norm_weight = self.head.norm.weight
        fc: nn.Module = nn.Identity()
        if num_classes > 0:
            fc = PointwiseLinear(self.num_features, num_classes).to(norm_weight.device, norm_weight.dtype)
            _init_weights(fc)
        self.head.fc = fc
        self.num_classes = num_classes

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the 4 stages, (N, C_i, H/s, W/s) for strides s = 4, 8, 16, 32.

        The maps are (N, C, H, W) views of channels-last memory (no copy).
        """
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x.permute(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features (N, num_features): the input of ``head.fc``."""
        x = self.stages(self.stem(x))
        return self.head.norm(x.mean((1, 2)))  # (N, H, W, C) -> (N, C)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from ``forward_features`` output."""
        return self.head.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
