"""One-node launch without Ray: torchrun starts launch.num_workers processes running the worker.

Like the Ray launcher, this process checks everything it can first and holds the run's lease for
the whole job (the workers continue it through ``PRETRAIN_LEASE_HOLDER``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from pretrain.config import Config, dump_toml
from pretrain.lease import HOLDER_ENV
from pretrain.preflight import check_run
from pretrain.worker import EXIT_FILE_ENV


def run_torchrun(cfg: Config) -> int:
    """Run `python -m torch.distributed.run -m pretrain.worker` on this node; returns its exit code."""
    from launch.ray_train import driver_lease

    check_run(cfg, on_cuda=cfg.launch.use_gpu)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="resolved-", delete=False) as f:
        f.write(dump_toml(cfg))
        path = f.name
    try:
        with driver_lease(cfg) as holder:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={cfg.launch.num_workers}", "-m", "pretrain.worker", "--config", path]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(cfg.launch.cpus_per_worker))), HOLDER_ENV: holder,
                   EXIT_FILE_ENV: path + ".exit"}
            code = subprocess.call(cmd, env=env)
            return rank0_exit_code(path + ".exit", code)
    finally:
        for leftover in (path, path + ".exit"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def rank0_exit_code(exit_file: str, torchrun_code: int) -> int:
    """Rank 0's own exit code (2 = not restartable, 75 = preempted) when it wrote one, else torchrun's."""
    try:
        with open(exit_file) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return torchrun_code
