"""torch.compile for training, block by block.

Each ConvNeXt block (and stem, downsampling layers and head) is compiled in place with
``nn.Module.compile``: parameter names do not change (a whole-model ``torch.compile`` would add
``_orig_mod.`` and change every checkpoint key), activation checkpointing keeps working (non-reentrant
``checkpoint`` of a compiled block), and the graph boundaries between blocks let ZeRO's per-parameter
gradient hooks fire during backward (within one whole-model compiled backward they would all wait for
its end, and no gradient reduction could overlap it).
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, mode: str = "default") -> int:
    """Compile every block-level module of a ConvNeXt in place; returns how many were compiled."""
    from pretrain.models.convnext import Block, Downsample, Head, Stem

    count = 0
    for module in model.modules():
        if isinstance(module, (Block, Stem, Downsample, Head)):
            module.compile(mode=None if mode == "default" else mode, dynamic=False)
            count += 1
    return count
