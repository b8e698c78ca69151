"""Linear and convolution that run bf16 through fp32 kernels on CPUs without bf16 instructions.

Why hand-written: on CPUs without AVX512-BF16/AMX (e.g. AVX2-only hosts, where our tests, the demo
and DeepSpeed's bf16 CPU mode run), PyTorch's bf16 GEMM falls back to a reference kernel (≈ 15×
slower than fp32 sgemm here) and bf16 convolutions to ``_slow_conv2d`` (one im2col per sample).
Rounding the inputs to bf16, running the fp32 oneDNN/MKL kernel and rounding the output to bf16
gives what a native bf16 kernel computes (bf16 inputs, their products exact in fp32, fp32
accumulation, bf16 output) up to summation order, at fp32-kernel speed. Nothing changes where bf16
is native (any GPU, AMX/AVX512-BF16 CPUs) or for fp32/fp16 compute.

The model itself uses stock ``nn.Conv2d`` and ``F.linear``; :func:`apply` swaps its layers' classes for
emulating subclasses (same parameters, state-dict keys and options) and is called by the trainer only
on a CPU without native bf16 when training in bf16.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _native_cpu_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _emulate(x: torch.Tensor) -> bool:
    """True when this op would run as bf16 on a CPU that lacks bf16 kernels."""
    if x.device.type != "cpu":
        return False
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return bf16 and not _native_cpu_bf16()


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor's bf16 value held in fp32 (rounds fp32 inputs the way autocast would)."""
    if t is None:
        return None
    return (t if t.dtype == torch.bfloat16 else t.to(torch.bfloat16)).float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``; bf16 on a CPU without bf16 kernels runs as fp32 GEMM with bf16 in/out."""
    if not _emulate(x):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        return F.linear(_fp32(x), _fp32(weight), _fp32(bias)).to(torch.bfloat16)


class _EmulatedConv2d(nn.Conv2d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not _emulate(x):
            return super()._conv_forward(x, weight, bias)
        with torch.autocast("cpu", enabled=False):
            # .to() keeps the memory format, so channels-last stays channels-last
            return super()._conv_forward(_fp32(x), _fp32(weight), _fp32(bias)).to(torch.bfloat16)


def needed(dtype: str, device: torch.device) -> bool:
    """Whether bf16 training on `device` needs the emulation."""
    return dtype == "bf16" and device.type == "cpu" and not _native_cpu_bf16()


def apply(model: nn.Module) -> int:
    """Route `model`'s convolutions and pointwise Linears through the fp32 kernels; returns how many."""
    from pretrain.models.convnext import PointwiseLinear

    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = _EmulatedConv2d
            count += 1
        elif type(module) is PointwiseLinear:
            module.linear = linear  # the instance attribute shadows the class's F.linear
            count += 1
    return count
