"""One-node launch without Ray: torchrun starts launch.num_workers processes running the worker."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from pretrain.config import Config, dump_toml


def run_torchrun(cfg: Config) -> int:
    """Run `python -m torch.distributed.run -m pretrain.worker` on this node; returns its exit code."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="resolved-", delete=False) as f:
        f.write(dump_toml(cfg))
        path = f.name
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.launch.num_workers}", "-m", "pretrain.worker", "--config", path]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(cfg.launch.cpus_per_worker)))}
        return subprocess.call(cmd, env=env)
    finally:
        os.unlink(path)
