"""The Task interface: everything that differs between classification, segmentation and detection.

The Trainer owns the loop, DeepSpeed, checkpoints, resume, the EMA and logging; a Task supplies the
rest, so a new task is one module implementing this class plus its config section:

    raw sample --decoder (loader workers)--> (uint8 image, target) --decoder.collate--> Batch
    Batch --inputs (device)--> (x, target) --model--> output --loss--> scalar
    eval batches --evaluate--> metrics;  batch --preview--> TensorBoard image

Decoders run in DataLoader worker processes and must pickle; their randomness is seeded per sample by
the loader (exact resume), so they draw only from python's ``random``, numpy's and torch's CPU RNGs.
``inputs`` gets a seed per micro-batch for batch-level randomness (mixup).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from pretrain.config import ModelConfig, StorageConfig
from pretrain.data.batch import Batch
from pretrain.data.decoder import SampleDecoder

if TYPE_CHECKING:
    from pretrain.init_from import Source


class Task(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The backbone with this task's head(s): a plain ``nn.Module`` on the CPU, no I/O."""

    def load_pretrained(self, model: torch.nn.Module, source: Source, cfg: ModelConfig, classes: list[str],
                        storage_cfg: StorageConfig | None) -> None:
        """Load ``model.init_from`` (a resolved :class:`pretrain.init_from.Source`) into a fresh `model`:
        by default the whole classification model with its head rule (``model.head_from``)."""
        from pretrain.init_from import initialize

        initialize(model, cfg, classes, storage_cfg, source)

    @abc.abstractmethod
    def decoder(self, train: bool) -> SampleDecoder:
        """The sample decoder of the train (augmenting) or eval loader."""

    @abc.abstractmethod
    def inputs(self, batch: Batch, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, Any]:
        """A batch on the device: the model's input in `dtype` and the loss's target."""

    @abc.abstractmethod
    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """The scalar training loss (fp32) of one micro-batch."""

    def zero_loss(self, output: Any) -> torch.Tensor:
        """A loss of 0 that still depends on every output: a rank whose micro-batch is empty takes part in
        backward's collectives with zero weight."""
        return output.float().sum() * 0.0

    @abc.abstractmethod
    def evaluate(self, forward: Callable, batches, dtype: torch.dtype) -> dict[str, float]:
        """Metrics over every rank (each rank yields the same number of batches: ZeRO-3 forwards are
        collectives)."""

    @abc.abstractmethod
    def describe(self, results: dict[str, dict[str, float]]) -> str:
        """One console line for the results of `evaluate` ({"model": ..., "ema": ...})."""

    def preview(self, batch: Batch) -> torch.Tensor | None:
        """Images for TensorBoard's first-step grid, (N, 3, H, W) in [0, 1]; None for none."""
        return batch.image.permute(0, 3, 1, 2).float() / 255  # (N, H, W, C) uint8 -> (N, C, H, W)
