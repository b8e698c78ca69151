"""Consolidate a checkpoint (any ZeRO stage, any world size) into one timm-compatible safetensors file.

    pretrain export RUN_URL OUT.safetensors [--ema] [--step N]

Writes OUT.safetensors (fp32 tensors with timm's ConvNeXt key names) and OUT.json, a model card
(variant, classes and label map, step, recipe, data manifest hash). timm loads it directly:
``timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=OUT, num_classes=C))``
(``num_classes`` belongs in the overlay: otherwise timm compares it with the default tag's 1000 classes
and drops the trained head).
"""

from __future__ import annotations

import json
from typing import Any

from safetensors.torch import save_file

from pretrain import state_format
from pretrain.checkpoint import CheckpointError, CheckpointManager
from pretrain.config import CheckpointConfig, StorageConfig


def export(run_url: str, out_path: str, ema: bool = False, step: int | None = None,
           storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
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
        saved = state_format.rank_tables(r["fragments"] for r in manifest["ranks"])
        kind = state_format.EMA if ema else state_format.MASTER
        cache: dict[int, dict] = {}

        def tensors_of(rank: int) -> dict:
            if rank not in cache:
                cache.clear()  # one rank file in memory at a time (consolidate reads each rank once)
                cache[rank] = manager.fetch_tensors(where, manifest, rank)
            return cache[rank]

        if ema and not any(k.startswith(f"{state_format.EMA}/") for k in tensors_of(0)):
            raise CheckpointError(f"{where.name} has no EMA (ema.enabled was false); export without --ema")
        state = {name: t.contiguous() for name, t in state_format.consolidate(saved, tensors_of, kind).items()}
        config = manifest["config"]
        card = {"variant": config["model"]["name"], "num_classes": config["model"]["num_classes"],
                "weights": "ema" if ema else "model", "step": manifest["step"],
                "total_steps": manifest.get("total_steps"), "epoch": manifest.get("epoch"),
                "classes": manifest.get("classes"), "label_source": manifest.get("data", {}).get("label_source"),
                "data_manifest_sha256": manifest.get("data", {}).get("manifest_sha256"),
                "train_url": manifest.get("data", {}).get("train_url"), "data_changes": manifest.get("data_changes"),
                "metrics": manifest.get("metrics"), "recipe": config, "source": manager.url(where),
                "timm": f"timm.create_model('{config['model']['name']}', pretrained=True, "
                        f"pretrained_cfg_overlay=dict(file='{out_path}', num_classes="
                        f"{config['model']['num_classes']}))"}
        save_file(state, out_path, metadata={"format": "pt", "variant": card["variant"],
                                            "step": str(manifest["step"]), "weights": card["weights"]})
        card_path = out_path.rsplit(".", 1)[0] + ".json"
        with open(card_path, "w") as f:
            json.dump(card, f, indent=1)
        return {"weights": out_path, "card": card_path, "step": manifest["step"], "num_tensors": len(state)}
    finally:
        manager.close()
