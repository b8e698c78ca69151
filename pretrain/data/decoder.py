"""The worker side of a task (:mod:`pretrain.tasks`): what a raw shard sample becomes in the loaders."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch.utils.data import default_collate

from pretrain.data.reader import RawSample, Skipped


class SampleDecoder(abc.ABC):
    """The worker side of a task: decode + augment one raw sample, collate a micro-batch. Pickled
    into every DataLoader worker."""

    @abc.abstractmethod
    def __call__(self, raw: RawSample) -> tuple[torch.Tensor, Any] | Skipped:
        """Raw shard sample -> (uint8 (H, W, 3) image, target); Skipped (with its reason) if unusable."""

    def collate(self, images: list[torch.Tensor], targets: list[Any]) -> tuple[torch.Tensor, Any]:
        """Stack a micro-batch (in a worker: straight into shared memory)."""
        return default_collate(images), torch.as_tensor(targets)

    def empty_target(self) -> Any:
        """The target of an empty batch (one that only reports skips, or pads evaluation)."""
        return torch.zeros(0, dtype=torch.long)
