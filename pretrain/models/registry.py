"""ConvNeXt variants as pure data (no torch import, so configs validate model names cheaply).

Depths and widths follow the paper (T/S/B/L/XL) and timm's small variants (atto/femto/pico/nano),
so that state dicts line up key-for-key with timm's ``convnext_*`` models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    conv_mlp: bool = False
    """timm's atto..nano use 1x1-conv MLPs (conv_mlp=True); T..XL use Linear MLPs like the paper."""


VARIANTS: dict[str, Variant] = {
    "convnext_atto": Variant((2, 2, 6, 2), (40, 80, 160, 320), conv_mlp=True),
    "convnext_femto": Variant((2, 2, 6, 2), (48, 96, 192, 384), conv_mlp=True),
    "convnext_pico": Variant((2, 2, 6, 2), (64, 128, 256, 512), conv_mlp=True),
    "convnext_nano": Variant((2, 2, 8, 2), (80, 160, 320, 640), conv_mlp=True),
    "convnext_tiny": Variant((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": Variant((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": Variant((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": Variant((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": Variant((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
