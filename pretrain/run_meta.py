"""What a checkpoint manifest says about the run, typed: written by the trainer, read back by resume,
export and `model.init_from`. The checkpoint manager stores these records without interpreting them.

A manifest is ``{format, step, dir, world_size, created_unix, files}`` (the checkpoint manager's own),
``ranks`` (one :class:`RankRecord` per rank) and the fields of :class:`RunMeta` (rank 0's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataIdentity:
    """What identifies a shard set: a re-built set has another sample count or manifest digest."""

    train_url: str
    num_samples: int
    manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"train_url": self.train_url, "num_samples": self.num_samples, "manifest_sha256": self.manifest_sha256}


@dataclass
class RankRecord:
    """One rank's part of the manifest: its fragment table, its data counters and its loader cursors."""

    fragments: list[list]
    counters: dict[str, int]
    loader: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RankRecord":
        return cls(list(data["fragments"]), dict(data.get("counters", {})), dict(data.get("loader", {})))


@dataclass
class RunMeta:
    """Rank 0's record of the run at a checkpoint."""

    config: dict[str, Any]
    """The resolved config (plain data)."""
    optimizer_step: int
    total_steps: int
    finished: bool
    epoch: float
    counters: dict[str, int]
    """Step counters, the same on every rank (nonfinite_skipped, fp16_overflow_steps, ...)."""
    classes: list[str]
    data: DataIdentity
    label_source: str
    data_changes: list[dict[str, Any]] = field(default_factory=list)
    loader: dict[str, Any] = field(default_factory=dict)
    """The loader state every rank shares (seed, set size, topology, what the epoch has left)."""
    loss_scaler: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ema_enabled(self) -> bool:
        return bool(self.config.get("ema", {}).get("enabled"))

    def state_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = {**self.data.to_dict(), "label_source": self.label_source}
        del out["label_source"]
        return out


@dataclass
class CheckpointRecord:
    """A whole manifest, read back: the step it holds, every rank's record and the run's."""

    step: int
    world_size: int
    ranks: list[RankRecord]
    run: RunMeta

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "CheckpointRecord":
        data = manifest.get("data", {})
        run = RunMeta(config=manifest.get("config", {}), optimizer_step=int(manifest.get("optimizer_step", 0)),
                      total_steps=int(manifest.get("total_steps", 0)), finished=bool(manifest.get("finished")),
                      epoch=float(manifest.get("epoch", 0.0)), counters=dict(manifest.get("counters", {})),
                      classes=list(manifest.get("classes") or []),
                      data=DataIdentity(data.get("train_url", ""), int(data.get("num_samples", -1)),
                                        data.get("manifest_sha256", "")),
                      label_source=data.get("label_source", ""),
                      data_changes=list(manifest.get("data_changes", [])), loader=dict(manifest.get("loader", {})),
                      loss_scaler=dict(manifest.get("loss_scaler", {})), metrics=dict(manifest.get("metrics", {})))
        return cls(int(manifest["step"]), int(manifest["world_size"]),
                   [RankRecord.from_dict(r) for r in manifest["ranks"]], run)

    @property
    def fragment_tables(self) -> list[list[list]]:
        return [r.fragments for r in self.ranks]
