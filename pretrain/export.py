"""Consolidate a checkpoint (any ZeRO stage, any world size) into one timm-compatible safetensors file.

    pretrain export RUN_URL OUT.safetensors [--ema] [--step N]

Writes OUT.safetensors (fp32 tensors with timm's ConvNeXt key names) and OUT.json, a model card
(variant, classes and label map, step, recipe, data manifest hash). timm loads it directly:
``timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=OUT, num_classes=C))``
(``num_classes`` belongs in the overlay: otherwise timm compares it with the default tag's 1000 classes
and drops the trained head).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from pretrain import state_format
from pretrain.checkpoint import CheckpointDir, CheckpointError, CheckpointManager
from pretrain.config import CheckpointConfig, StorageConfig
from pretrain.run_meta import CheckpointRecord


@dataclass
class CommittedCheckpoint:
    """One committed checkpoint of a run, opened for reading (export, ``model.init_from``)."""

    manager: CheckpointManager
    where: CheckpointDir
    manifest: dict[str, Any]
    record: CheckpointRecord

    @property
    def url(self) -> str:
        return self.manager.url(self.where)

    def weights(self, ema: bool) -> dict[str, torch.Tensor]:
        """Full fp32 tensors (timm names) of the master weights or the EMA, from every rank's fragments."""
        saved = state_format.rank_tables(self.record.fragment_tables)
        kind = state_format.EMA if ema else state_format.MASTER
        cache: dict[int, dict] = {}

        def tensors_of(rank: int) -> dict:
            if rank not in cache:
                cache.clear()  # one rank file in memory at a time (consolidate reads each rank once)
                cache[rank] = self.manager.fetch_tensors(self.where, self.manifest, rank)
            return cache[rank]

        if ema and not any(k.startswith(f"{state_format.EMA}/") for k in tensors_of(0)):
            raise CheckpointError(f"{self.where.name} has no EMA (ema.enabled was false); export without --ema")
        state = state_format.consolidate(saved, tensors_of, kind)
        state.update(state_format.buffers_in(tensors_of(0)))  # rank 0's (BatchNorm statistics, ...)
        return {name: t.contiguous() for name, t in state.items()}


@contextlib.contextmanager
def committed_checkpoint(run_url: str, step: int | None = None,
                         storage_cfg: StorageConfig | None = None) -> Iterator[CommittedCheckpoint]:
    """The newest committed checkpoint of `run_url` (or the one at `step`); raises CheckpointError if none."""
    manager = CheckpointManager(run_url, CheckpointConfig(), storage_cfg, rank=0, world_size=1)
    try:
        committed = manager.committed()
        if not committed:
            raise CheckpointError(f"no committed checkpoint under {manager.root}")
        if step is None:
            where = committed[-1]
        else:
            matching = [d for d in committed if d.step == step]
            if not matching:
                raise CheckpointError(f"no committed checkpoint at step {step}; committed steps: "
                                      f"{sorted({d.step for d in committed})}")
            where = matching[-1]
        manifest = manager.read_manifest(where)
        yield CommittedCheckpoint(manager, where, manifest, CheckpointRecord.from_manifest(manifest))
    finally:
        manager.close()


def export(run_url: str, out_path: str, ema: bool = False, step: int | None = None,
           storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    with committed_checkpoint(run_url, step, storage_cfg) as ckpt:
        state = ckpt.weights(ema)
        step, run = ckpt.record.step, ckpt.record.run
        config = run.config
        card = {"variant": config["model"]["name"], "num_classes": config["model"]["num_classes"],
                "task": config.get("task", {}).get("name", "classification"),
                "weights": "ema" if ema else "model", "step": step, "total_steps": run.total_steps,
                "epoch": run.epoch, "classes": run.classes, "label_source": run.label_source,
                "data_manifest_sha256": run.data.manifest_sha256, "train_url": run.data.train_url,
                "data_changes": run.data_changes, "metrics": run.metrics, "recipe": config, "source": ckpt.url,
                "timm": f"timm.create_model('{config['model']['name']}', pretrained=True, "
                        f"pretrained_cfg_overlay=dict(file='{out_path}', num_classes="
                        f"{config['model']['num_classes']}))"}
        save_file(state, out_path, metadata={"format": "pt", "variant": card["variant"],
                                            "step": str(step), "weights": card["weights"]})
        card_path = out_path.rsplit(".", 1)[0] + ".json"
        with open(card_path, "w") as f:
            json.dump(card, f, indent=1)
        return {"weights": out_path, "card": card_path, "step": step, "num_tensors": len(state)}
