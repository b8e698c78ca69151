"""Tasks as plug-ins (see base.py): `build_task` picks one from the `task` config section."""

from __future__ import annotations

import torch

from pretrain.config import Config
from pretrain.data.shards import Manifest
from pretrain.data.decoder import SampleDecoder
from pretrain.tasks.base import Task
from pretrain.tasks.classification import ClassDecoder, ClassificationTask
from pretrain.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (ClassificationTask, SegmentationTask)}


def build_task(cfg: Config, manifest: Manifest, device: torch.device) -> Task:
    """The configured task over the training set's classes; the task sees only its own config sections."""
    if cfg.task.name == "classification":
        return ClassificationTask(cfg.model, cfg.data, manifest.classes, manifest.label_source, device)
    if cfg.task.name == "segmentation":
        return SegmentationTask(cfg.model, cfg.data, cfg.segmentation, manifest, device)
    raise ValueError(f"task.name {cfg.task.name!r} has no builder; valid: {sorted(TASKS)}")


__all__ = ["TASKS", "ClassDecoder", "ClassificationTask", "SampleDecoder", "SegmentationTask", "Task", "build_task"]
