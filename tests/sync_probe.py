"""Count host synchronisations and collectives per training step, by who makes them.

    torchrun --nproc_per_node 2 -m tests.sync_probe --config X --set ...

Trains with the real Trainer and, for steps 3..6 (after warm-up, no logging or checkpoint steps),
counts every call that makes the host wait for a device tensor on a GPU (``Tensor.item``, ``tolist``,
``__bool__``, ``__float__``, ``__int__``, ``cpu``, ``torch.cuda.synchronize``) and every collective,
attributed to the first caller outside torch: ``pretrain`` (ours) or ``deepspeed``. Rank 0 prints one
``SYNCS {json}`` line with the counts per step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
from collections import Counter

import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.engine.distributed import destroy, init_distributed
from pretrain.trainer import Trainer

COUNTED_STEPS = range(3, 7)
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "broadcast_object_list", "all_gather_object", "reduce")
counts: Counter = Counter()
active = False


def _who() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if f"{os.sep}torch{os.sep}" in path or path.endswith("sync_probe.py"):
            continue
        if f"{os.sep}deepspeed{os.sep}" in path:
            return "deepspeed"
        if f"{os.sep}pretrain{os.sep}" in path:
            return "pretrain"
        return "other"
    return "other"


def _wrap(owner, name: str, kind: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        if active:
            counts[f"{_who()}/{kind}/{name}"] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)


class ProbedTrainer(Trainer):
    def train_step(self, batches, times):
        global active
        active = self.state.step + 1 in COUNTED_STEPS
        return super().train_step(batches, times)

    def _control(self, loss=None):
        global active
        try:
            return super()._control(loss)
        finally:
            active = False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    for name in SYNCS:
        _wrap(torch.Tensor, name, "sync")
    _wrap(torch.cuda, "synchronize", "sync")
    for name in COLLECTIVES:
        if hasattr(dist, name):
            _wrap(dist, name, "collective")
    cfg = load_config(args.config, args.set)
    ctx = init_distributed(300)
    trainer = ProbedTrainer(cfg, ctx)
    try:
        trainer.fit()
    finally:
        trainer.close()
    if ctx.is_main:
        steps = len(COUNTED_STEPS)
        print("SYNCS " + json.dumps({k: v / steps for k, v in sorted(counts.items())}), flush=True)
    destroy()


if __name__ == "__main__":
    sys.exit(main())
