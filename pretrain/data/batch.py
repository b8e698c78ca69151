"""The micro-batch the loaders hand to the trainer (a typed record instead of a dict)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Batch:
    """`image`: uint8 (N, H, W, 3), normalized on the device; `target`: the task's targets (class
    indices (N,) for classification). Training batches also say where they came from: the reader
    stream and its cursor after this batch (the loader's resume state), and the samples skipped on the way.
    An empty batch (N = 0) carries only skips, or pads evaluation so every rank runs the same passes."""

    image: torch.Tensor
    target: Any
    keys: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    stream: int = -1
    cursor: int = -1
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        from torch.utils.data._utils.pin_memory import pin_memory

        return replace(self, image=self.image.pin_memory(), target=pin_memory(self.target))

    @classmethod
    def empty(cls, image_shape: tuple[int, int, int], target: Any = None, **bookkeeping) -> "Batch":
        target = torch.zeros(0, dtype=torch.long) if target is None else target
        return cls(torch.zeros((0, *image_shape), dtype=torch.uint8), target, **bookkeeping)
