"""The function every training process runs, whoever launched it (torchrun, DeepSpeed launcher, Ray).

    torchrun --nproc_per_node 2 -m pretrain.worker --config configs/demo.toml --set data.train_url=...

`train_worker` takes the resolved config as plain data, joins the process group, trains and returns
a summary. SIGTERM (spot preemption, `kubectl delete`, Ray stopping a worker) asks for a checkpoint
at the next step boundary followed by a clean exit; launchers can add their own stop source.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

import torch

from pretrain.config import config_from_dict, config_to_dict, load_config


EXIT_FILE_ENV = "PRETRAIN_EXIT_FILE"
"""Rank 0 writes its exit code (0, 2, 75) here, for launchers that cannot pass it through (torchrun)."""


class StopFlag:
    """Set by SIGTERM/SIGINT or polled from a launcher hook; read once per step by the trainer."""

    def __init__(self, extra: Callable[[], bool] | None = None):
        self._event = threading.Event()
        self._extra = extra

    def set(self, *_: Any) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set() or bool(self._extra and self._extra())

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.set)


def setup_logging(rank: int) -> None:
    """Our loggers get their own stderr handler; the root logger is left to the launcher (Ray
    captures it), so that nothing is printed twice."""
    logger = logging.getLogger("pretrain")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def train_worker(config: dict[str, Any], stop_requested: Callable[[], bool] | None = None,
                 lease_holder: str = "", on_first_step: Callable[[], None] | None = None,
                 device: torch.device | None = None) -> dict[str, Any]:
    """Train with `config` (a resolved config dict) in this process; returns the run summary.

    `lease_holder` is the id under which a driver holds the run's lease (also read from
    ``PRETRAIN_LEASE_HOLDER``); without one, rank 0 takes the lease itself and releases it at the end.
    `on_first_step` is called once this process completes its first optimizer step (restart policy).
    `device` is the GPU the launcher assigned (Ray); without it, torchrun's LOCAL_RANK picks it.
    """
    from pretrain.engine.distributed import destroy, init_distributed, nccl_debug_env
    from pretrain.lease import HOLDER_ENV
    from pretrain.trainer import Trainer

    cfg = config_from_dict(config)
    setup_logging(int(os.environ.get("RANK", "0")))
    created_group = not torch.distributed.is_initialized()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
    for key, value in nccl_debug_env(cfg.launch.nccl_trace_dir).items():
        os.environ.setdefault(key, value)  # torchrun: before the process group exists (Ray sets them itself)
    if torch.cuda.is_available():
        os.makedirs(cfg.launch.nccl_trace_dir, exist_ok=True)
    ctx = init_distributed(cfg.launch.collective_timeout_s, device)
    setup_logging(ctx.rank)
    stop = StopFlag(stop_requested)
    stop.install()
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, stop, lease_holder=lease_holder or os.environ.get(HOLDER_ENV, ""),
                          on_first_step=on_first_step)
        return trainer.fit()
    except RuntimeError as exc:
        if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
            raise RuntimeError(f"rank {ctx.rank}: a collective timed out after launch.collective_timeout_s="
                               f"{cfg.launch.collective_timeout_s:.0f}s; another rank is hung or dead: {exc}") from exc
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if created_group:
            destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    from pretrain.run_errors import RUN_ENDING
    from pretrain.run_status import RunStatus, exit_code

    try:
        summary = train_worker(config_to_dict(load_config(args.config, args.set)))
    except RUN_ENDING as exc:  # a restart would fail the same way: exit 2, with the reason on one line
        print(f"pretrain worker: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        summary = {"status": RunStatus.FAILED.value, "error": f"{type(exc).__name__}: {exc}"}
    code = exit_code(summary["status"])
    if os.environ.get("RANK", "0") == "0":
        print("SUMMARY " + json.dumps(summary), flush=True)
        if os.environ.get(EXIT_FILE_ENV):  # torchrun reports any non-zero exit as 1; the launcher reads this
            with open(os.environ[EXIT_FILE_ENV], "w") as f:
                f.write(str(code))
    return code


if __name__ == "__main__":
    sys.exit(main())
