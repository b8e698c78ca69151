"""Resume decisions, made before any tensor is copied.

Two kinds of "no" are kept apart:

- **unusable checkpoint** (a file missing, its size or sha256 not matching the manifest, unreadable):
  the next older committed checkpoint is tried. If every one is unusable the run stops with
  :class:`NoUsableCheckpoint`: it never starts again from step 0 over committed work.
- **this run cannot resume like this** (:class:`pretrain.config.ResumeMismatch`, a ``ConfigError``):
  other model shapes, another config, another shard set (by sample count or manifest sha256) without
  ``run.allow_data_change``. The run stops at once, exit code 2; nothing is loaded or written.

Rank 0 lists the checkpoints and reads each manifest once, and broadcasts it; each rank then fetches
and verifies only the files it loads (its own two for an exact resume, the overlapping ones for a
resharded resume), so a resume costs O(files), not O(ranks x files). All ranks agree on the outcome
before anything is copied (one gather of the ranks' verdicts per candidate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pretrain.checkpoint import CheckpointDir, CheckpointError, CheckpointManager
from pretrain.config import Config, ResumeMismatch, config_diff, config_to_dict
from pretrain.engine.distributed import on_rank0
from pretrain.run_errors import FatalRunError
from pretrain.run_meta import CheckpointRecord, DataIdentity

log = logging.getLogger(__name__)


class NoUsableCheckpoint(CheckpointError, FatalRunError):
    """The run.url holds committed checkpoints, but none of them can be loaded."""


@dataclass
class Candidate:
    where: CheckpointDir
    manifest: dict[str, Any]
    """As stored (the checkpoint manager verifies files against it)."""
    record: CheckpointRecord
    """The same, typed."""


@dataclass
class ResumeScan:
    """What rank 0 found under the run's checkpoints, identical on every rank after the broadcast."""

    committed: list[CheckpointDir]
    unusable: list[str] = field(default_factory=list)
    """Checkpoints passed over, with the reason (reported in the log and the run summary)."""


def scan(ckpt: CheckpointManager, may_clean: bool) -> ResumeScan:
    """Rank 0 lists the checkpoints once and, holding the run's lease, removes uncommitted leftovers."""
    def list_and_clean() -> tuple[list[CheckpointDir], list[CheckpointDir]]:
        committed, uncommitted = ckpt.scan()
        removed = ckpt.cleanup_uncommitted(uncommitted) if may_clean else []
        if removed:
            log.warning("removed uncommitted checkpoint leftovers at steps %s", [d.step for d in removed])
        return committed, committed + (uncommitted if not removed else [])  # removed names may be reused

    committed, existing = on_rank0(list_and_clean)
    ckpt.reserve(existing)
    return ResumeScan(committed)


def next_candidate(ckpt: CheckpointManager, state: ResumeScan, below: CheckpointDir | None) -> Candidate | None:
    """The newest committed checkpoint older than `below` whose manifest reads (rank 0 reads, all get it)."""
    def read_newest() -> tuple[CheckpointDir | None, dict | None, list[str]]:
        for where in reversed([d for d in state.committed if below is None or d < below]):
            try:
                return where, ckpt.read_manifest(where), list(state.unusable)
            except (CheckpointError, OSError) as exc:
                state.unusable.append(f"{where.name}: {exc}")
                log.error("checkpoint %s is unusable (%s); trying an older one", ckpt.url(where), exc)
        return None, None, list(state.unusable)

    where, manifest, state.unusable = on_rank0(read_newest)
    return Candidate(where, manifest, CheckpointRecord.from_manifest(manifest)) if where is not None else None


def check_compatible(cfg: Config, record: CheckpointRecord, data: DataIdentity) -> dict[str, Any] | None:
    """Raise :class:`ResumeMismatch` unless this run may continue `record`; returns a data change to record."""
    old, new = record.run.config, config_to_dict(cfg)
    where = f"run.url {cfg.run.url} (checkpoint step {record.step})"
    old_model = old.get("model", {})
    if old_model.get("name") != cfg.model.name or old_model.get("num_classes") != cfg.model.num_classes:
        raise ResumeMismatch(f"{where} holds a {old_model.get('name')} model with {old_model.get('num_classes')} "
                             f"classes; this run builds {cfg.model.name} with {cfg.model.num_classes}. Use a new "
                             "run.url (model.init_from starts a new run from its weights).")
    diffs = config_diff(old, new)
    if diffs and not cfg.run.allow_config_change:
        raise ResumeMismatch(f"{where} holds checkpoints of a different configuration:\n  " + "\n  ".join(diffs)
                             + "\nUse a new run.url, or set run.allow_config_change=true to resume anyway.")
    saved = record.run.data
    if saved.num_samples == data.num_samples and saved.manifest_sha256 == data.manifest_sha256:
        return None
    change = {"step": record.step, "from": saved.to_dict(), "to": data.to_dict()}
    if not cfg.run.allow_data_change:
        raise ResumeMismatch(
            f"{where} was trained on another shard set: {saved.num_samples} samples (manifest sha256 "
            f"{saved.manifest_sha256[:12]}) at {saved.train_url}, now {data.num_samples} "
            f"samples (sha256 {data.manifest_sha256[:12]}) at {data.train_url}. Point data.train_url back at the "
            "original shards, or set run.allow_data_change=true to continue on the new set (model, optimizer, "
            "EMA, LR position and step continue; the data order starts afresh on the new set).")
    return change


def check_shapes(record: CheckpointRecord, model_shapes: dict[str, tuple[int, ...]], cfg: Config) -> None:
    """Raise :class:`ResumeMismatch` if the checkpoint's parameters are not this model's."""
    from pretrain import state_format

    saved = state_format.parameter_shapes(state_format.rank_tables(record.fragment_tables).values())
    wrong = [f"{name}: checkpoint {saved.get(name)} vs model {shape}" for name, shape in model_shapes.items()
             if saved.get(name) != shape]
    extra = sorted(set(saved) - set(model_shapes))
    if wrong or extra:
        raise ResumeMismatch(f"run.url {cfg.run.url}: the checkpoint's parameters do not fit this model: "
                             + "; ".join(wrong[:8] + [f"{n}: not in the model" for n in extra[:8]]))
