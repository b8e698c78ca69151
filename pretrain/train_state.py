"""Training progress: the step, the counters and the loss record that every checkpoint saves besides
tensors, RNG and the loader. It owns its state (torchtitan's Stateful pattern): the trainer hands
`state_dict()` / `rank_state_dict()` to the checkpoint records and `load_state_dict` takes them back.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pretrain.run_meta import CheckpointRecord


@dataclass
class TrainState:
    step: int = 0
    data_counters: Counter = field(default_factory=Counter)
    """This rank's: samples_read and skipped/<reason>; saved per rank, summed over ranks when reported."""
    step_counters: Counter = field(default_factory=Counter)
    """The same on every rank: nonfinite_skipped, fp16_overflow_steps, nonfinite_in_row."""
    loss_first: float | None = None
    loss_last: float | None = None
    data_changes: list[dict[str, Any]] = field(default_factory=list)
    """Each shard-set change the run continued across (run.allow_data_change): step, from, to."""

    def state_dict(self) -> dict[str, Any]:
        """What every rank shares (rank 0 records it in the run's metadata)."""
        return {"counters": dict(self.step_counters), "data_changes": list(self.data_changes),
                "metrics": {"loss_first": self.loss_first, "loss_last": self.loss_last}}

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own part (its record in the manifest)."""
        return {"counters": dict(self.data_counters)}

    def load_state_dict(self, record: CheckpointRecord, rank: int, same_ranks: bool) -> None:
        """Continue from `record`. On another world size each rank's share of the data counters means
        nothing: rank 0 carries the totals, so that the reported sums survive."""
        self.step = record.step
        self.step_counters = Counter(record.run.counters)
        self.data_changes = list(record.run.data_changes)
        self.loss_first = record.run.metrics.get("loss_first")
        if same_ranks:
            self.data_counters = Counter(record.ranks[rank].counters)
        else:
            totals = sum((Counter(r.counters) for r in record.ranks), Counter())
            self.data_counters = totals if rank == 0 else Counter()

    def epoch(self, global_batch: int, num_samples: int) -> float:
        """Epochs of the current shard set (counted from the last data change)."""
        origin = self.data_changes[-1]["step"] if self.data_changes else 0
        return (self.step - origin) * global_batch / num_samples
